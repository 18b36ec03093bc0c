"""`lilgatsby compare`: identical, one ulp apart, differently shaped, truncated."""

import json
import re
import shutil
import struct

import pytest

from runner.cli import main
from runner.launch.train import run
from runner.layout import RECORDING


@pytest.fixture(scope="module")
def twins(tmp_path_factory, small_book):
    """Two runs of one config, and a shorter run."""
    from runner.config import build_experiment
    base = {"name": "c", "corpus": {"path": str(small_book)}, "train": {"steps": 12, "batch_size": 4, "device": "cpu"}}
    dirs = {}
    for key, steps in (("a", 12), ("b", 12), ("short", 10)):
        dirs[key] = tmp_path_factory.mktemp(key)
        run(build_experiment({**base, "train": {**base["train"], "steps": steps}}), dirs[key], progress=False)
    return dirs


def tensor_offset(path, name: str) -> tuple[int, dict]:
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + size])
    return 8 + size + header[name]["data_offsets"][0], header[name]


def test_identical_runs(twins, capsys):
    assert main(["compare", str(twins["a"]), str(twins["b"])]) == 0  # run directories
    out = capsys.readouterr().out
    assert len(re.findall(r"^\w+\s+(BF16|F32)\s+\[[\d, ]+\]\s+identical$", out, re.M)) == 9
    assert "9 of 9 tensors identical" in out
    assert re.search(r"^parameters\s+full precision\s+initial identical, final identical$", out, re.M)
    assert "config differs" not in out  # (timings in the metadata may differ: they are not tensors)


def test_one_ulp_apart(twins, tmp_path, capsys):
    copy = tmp_path / RECORDING
    shutil.copy(twins["a"] / RECORDING, copy)
    start, info = tensor_offset(copy, "W")
    assert info["dtype"] == "BF16"
    where = start + 2 * (3 * 128 * 64 + 5 * 64 + 7)  # row 3, token 5, dimension 7
    data = bytearray(copy.read_bytes())
    (value,) = struct.unpack_from("<H", data, where)
    struct.pack_into("<H", data, where, value + 1)  # the next bf16 value (the same sign)
    copy.write_bytes(bytes(data))
    assert main(["compare", str(twins["a"] / RECORDING), str(copy)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("W "))
    assert "differs: 1 of 106,496 values" in line and "max 1 ulp (BF16)" in line and "first at row 3 (step 3)" in line
    assert "8 of 9 tensors identical" in out


def rewrite_metadata(path, **changes) -> None:
    """Change metadata in place (None removes a key); the header keeps its size (padded)."""
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + size])
    metadata = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= size
    data[8:8 + size] = encoded.ljust(size)
    path.write_bytes(bytes(data))


def test_full_precision_parameters(twins, tmp_path, capsys):
    """The recorded W is bf16: parameters that differ below it, or elsewhere, differ in their fingerprint."""
    copy = tmp_path / RECORDING
    shutil.copy(twins["a"] / RECORDING, copy)
    rewrite_metadata(copy, parameters_final_sha256="0" * 64)
    assert main(["compare", str(twins["a"]), str(copy)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^parameters\s+full precision\s+initial identical, final differs$", out, re.M)
    assert "9 of 9 tensors identical; the full-precision parameters differ" in out
    assert "metadata differs: parameters" not in out  # said once, on its own line
    rewrite_metadata(copy, parameters_initial_sha256=None, parameters_final_sha256=None)  # an older recording
    assert main(["compare", str(twins["a"]), str(copy)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^parameters\s+full precision\s+initial not recorded in B, final not recorded in B$", out, re.M)


def test_differently_shaped(twins, capsys):
    assert main(["compare", str(twins["a"]), str(twins["short"])]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^W\s+BF16 \[13, 128, 64\]\s+not comparable: BF16\[13, 128, 64\] vs BF16\[11, 128, 64\]$",
                     out, re.M)
    assert "config differs: train.steps: 12 vs 10" in out


@pytest.mark.parametrize("damage, message", [("truncate", "truncated: its header describes"),
                                             ("missing", "cannot open"), ("garbage", "not a safetensors recording")])
def test_bad_input_exits_2(twins, tmp_path, capsys, damage, message):
    broken = tmp_path / "broken.safetensors"
    if damage == "truncate":
        broken.write_bytes((twins["a"] / RECORDING).read_bytes()[:-1000])
    elif damage == "garbage":
        broken.write_bytes(b"\xff" * 64)
    assert main(["compare", str(twins["a"]), str(broken)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
