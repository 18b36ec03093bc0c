"""The KubeRay example against KubeRay's own RayJob schema (its CRD), with token authentication.

tests/data/kuberay-ray.io_rayjobs.yaml.gz is ray-operator/config/crd/bases/ray.io_rayjobs.yaml of
ray-project/kuberay at feeaf72facab4881ba2b179248bb67315634e229 (2026-08-19), gzipped. The
apiserver fills in the schema's defaults, then checks types, enums and required fields, and
prunes unknown fields silently: here every key must also be one the schema names (as
`kubectl apply --validate=strict` checks).
"""

import copy
import gzip

import jsonschema
import pytest
import yaml

from conftest import REPO

CRD = REPO / "tests" / "data" / "kuberay-ray.io_rayjobs.yaml.gz"
EXAMPLES = [REPO / "docker" / "kuberay-rayjob.yaml", REPO / "docker" / "kuberay-rayjob-s3.yaml"]


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys of `value` that `schema` does not name (what the apiserver would prune)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        if "properties" in schema:
            return [f for key, item in value.items()
                    for f in ([f"{path}.{key}"] if key not in schema["properties"]
                              else unknown_fields(item, schema["properties"][key], f"{path}.{key}"))]
        if isinstance(schema.get("additionalProperties"), dict):
            return [f for key, item in value.items()
                    for f in unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def with_defaults(value, schema: dict):
    """`value` with the schema's defaults filled in, as the apiserver does before validating."""
    if isinstance(value, dict) and "properties" in schema:
        filled = {key: copy.deepcopy(spec["default"]) for key, spec in schema["properties"].items()
                  if "default" in spec and key not in value}
        return {**{k: with_defaults(v, schema["properties"].get(k, {})) for k, v in value.items()}, **filled}
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(item, schema["items"]) for item in value]
    return value


def problems(manifest: dict, schema: dict) -> list[str]:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(with_defaults(manifest, schema))]
    return errors + [f"{field}: unknown field" for field in unknown_fields(manifest, schema)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_rayjob_with_token_auth(path, rayjob_schema):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["kind"] == "RayJob" and problems(manifest, rayjob_schema) == []
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "lilgatsby-ray-token"}
    assert cluster["headGroupSpec"].get("enableIngress") is False  # the dashboard stays in the cluster
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "dashboard-host" not in group["rayStartParams"]
        for container in group["template"]["spec"]["containers"]:  # no token written into the manifest
            assert not any("TOKEN" in env["name"] and "value" in env for env in container.get("env", []))


def test_the_check_finds_misspelt_and_mistyped_fields(rayjob_schema):
    manifest = yaml.safe_load(EXAMPLES[0].read_text())
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["rayClusterSpec"]["authOption"] = misspelt["spec"]["rayClusterSpec"].pop("authOptions")
    assert problems(misspelt, rayjob_schema) == [".spec.rayClusterSpec.authOption: unknown field"]
    mistyped = copy.deepcopy(manifest)
    mistyped["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "open"
    assert len(problems(mistyped, rayjob_schema)) == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_only_the_head_has_the_book(path):
    """The driver (in the head pod) reads the book from a ConfigMap and sends it to the tasks."""
    manifest = yaml.safe_load(path.read_text())
    assert manifest["spec"]["entrypoint"].split().count("--corpus") == 1
    book = manifest["spec"]["entrypoint"].split("--corpus ")[1].split()[0]
    cluster = manifest["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert {"name": "book", "configMap": {"name": "lilgatsby-book"}} in head["volumes"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "book"]
    assert book == f"{mount['mountPath']}/pg64317.txt"
    for group in cluster["workerGroupSpecs"]:
        assert all(v["name"] != "book" for v in group["template"]["spec"].get("volumes", []))


def test_the_s3_example_has_no_shared_volume_and_its_credentials_come_from_a_secret():
    manifest = yaml.safe_load(EXAMPLES[1].read_text())
    assert "--runs s3://" in manifest["spec"]["entrypoint"]
    cluster = manifest["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        # no claim: the bucket is the only shared storage (the head's one volume is the book's ConfigMap)
        assert all("configMap" in volume for volume in pod.get("volumes", []))
        for container in pod["containers"]:
            assert container["envFrom"] == [{"secretRef": {"name": "lilgatsby-s3"}}]
            assert not any(env["name"].startswith("AWS_") for env in container.get("env", []))
