#!/usr/bin/env bash
# make test-container: build the image on this machine (local Debian base, host wheelhouse), then in
# containers run the smoke experiment (bitwise equal to the same run on the host), the smoke sweep
# (local Ray inside), and the smoke sweep on a Ray cluster of a head and a worker container with
# token authentication (clients without the token, or with a wrong one, refused by the GCS and by
# the dashboard's Jobs API) and a worker of other code refused in one line; then the compose
# cluster, whose ports must listen on loopback only, with a sweep driven from its head and one
# submitted from the host as a Ray job; then the S3 compose cluster, whose workers mount no book
# and no runs directory: the smoke sweep into its bucket driven from the head and submitted from
# the host (the host is no node; one run compared with the host's each way), and a worker killed
# mid-run whose run resumes on the other worker, bitwise.
# Every result is checked on the host.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
CONTAINER=${CONTAINER:-podman}
BASE_IMAGE=${BASE_IMAGE:-localhost/lilgatsby-base:bookworm}
IMAGE=${IMAGE:-localhost/lilgatsby:test}
corpus=${LILGATSBY_CORPUS:?set LILGATSBY_CORPUS to the book (pg64317.txt)}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/docker/containers.conf}
lilgatsby=$repo/.venv/bin/lilgatsby
py=$repo/.venv/bin/python
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }
fail() { echo "test-container: FAIL: $*" >&2; exit 1; }

step "base image $BASE_IMAGE"
"$CONTAINER" image exists "$BASE_IMAGE" 2>/dev/null || docker/build-base.sh "$BASE_IMAGE" "$CONTAINER"
step "wheelhouse"
make --no-print-directory wheelhouse
step "image $IMAGE"
make --no-print-directory image CONTAINER="$CONTAINER" IMAGE="$IMAGE" BASE_IMAGE="$BASE_IMAGE" WHEELHOUSE=1

work=$(mktemp -d)
cleanup() { "$CONTAINER" rm -f lg-test-head lg-test-worker lg-test-other >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/runs"
run_in_container() {
    "$CONTAINER" run --rm --network host --user "$(id -u):$(id -g)" -v "$work/runs:/work/runs" \
        -v "$corpus:/work/data/pg64317.txt:ro" -e LILGATSBY_CORPUS=/work/data/pg64317.txt "$IMAGE" "$@"
}

step "smoke experiment in a container"
run_in_container train /opt/lilgatsby/experiments/smoke.yaml --quiet
run_dir=$(ls -d "$work"/runs/smoke/*/)
"$lilgatsby" verify "$run_dir" || fail "recording written in the container does not verify on the host"
[ "$(stat -c %u "$run_dir/recording.safetensors")" = "$(id -u)" ] || fail "recording not owned by the host user"
"$py" - "$run_dir/run.json" "$IMAGE" <<'PY' || fail "run.json does not record the image"
import json, sys
env = json.load(open(sys.argv[1]))["environment"]
assert env["image"] == sys.argv[2] and env["git_commit"] != "unknown", env
PY

step "the smoke experiment on the host: the same bits (lilgatsby compare)"
"$lilgatsby" train experiments/smoke.yaml --corpus "$corpus" --out "$work/host" --quiet
"$lilgatsby" compare "$work/host" "$run_dir" || fail "the container's recording differs from the host's"

step "smoke sweep in a container (local Ray inside)"
run_in_container sweep /opt/lilgatsby/experiments/smoke_sweep.yaml --quiet
check_index() {
    "$py" - "$1" <<'PY' || fail "index $1 incomplete"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
assert len(rows) == 4 and all(r["status"] == "complete" for r in rows), rows
PY
}
check_index "$work/runs/smoke_sweep/index.jsonl"

step "smoke sweep on a Ray cluster with token authentication: head + worker containers (the book on the head only)"
ray_port=6391 dashboard_port=8291
(umask 077 && python3 -c "import secrets; print(secrets.token_hex(32), end='')" > "$work/token")
cluster_node() {  # name, extra `run` arguments up to --, ray start arguments...
    local name=$1; shift
    local extra=()
    while [ "$1" != -- ]; do extra+=("$1"); shift; done
    shift
    "$CONTAINER" run -d --name "$name" --network host --user "$(id -u):$(id -g)" -v "$work/runs:/work/runs" \
        -v "$work/token:/run/lilgatsby/ray-token:ro" -e RAY_AUTH_MODE=token \
        -e RAY_AUTH_TOKEN_PATH=/run/lilgatsby/ray-token "${extra[@]}" \
        --entrypoint ray "$IMAGE" start --block --num-cpus 1 --disable-usage-stats "$@" >/dev/null
}
alive_nodes() {
    "$CONTAINER" exec lg-test-head python3 -c \
        "import ray; ray.init(address='127.0.0.1:$ray_port', logging_level='ERROR'); print(len([n for n in ray.nodes() if n['Alive']]))" 2>/dev/null || true
}
await_nodes() {  # count
    for _ in $(seq 60); do nodes=$(alive_nodes); [ "$nodes" = "$1" ] && return; sleep 2; done
    fail "the cluster has ${nodes:-no} alive nodes, not $1"
}
cluster_node lg-test-head -v "$corpus:/work/data/pg64317.txt:ro" -e LILGATSBY_CORPUS=/work/data/pg64317.txt -- \
    --head --port "$ray_port" --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port"
cluster_node lg-test-worker -- --address "127.0.0.1:$ray_port"
await_nodes 2
"$CONTAINER" exec lg-test-head lilgatsby sweep /opt/lilgatsby/experiments/smoke_sweep.yaml \
    --address "127.0.0.1:$ray_port" --runs /work/runs/cluster --quiet
check_index "$work/runs/cluster/smoke_sweep/index.jsonl"

step "a worker whose lilgatsby code differs (one comment added) is refused in one line"
installed=$("$CONTAINER" run --rm --entrypoint python3 "$IMAGE" -c "import runner.text; print(runner.text.__file__)")
"$CONTAINER" run --rm --entrypoint cat "$IMAGE" "$installed" > "$work/other-text.py"
echo "# another build" >> "$work/other-text.py"
cluster_node lg-test-other -v "$work/other-text.py:$installed:ro" -- --address "127.0.0.1:$ray_port"
await_nodes 3
set +e
out=$("$CONTAINER" exec lg-test-head lilgatsby sweep /opt/lilgatsby/experiments/smoke_sweep.yaml \
    --address "127.0.0.1:$ray_port" --runs /work/runs/other --quiet 2>&1)
code=$?
set -e
echo "exit $code: $(printf '%s\n' "$out" | grep 'lilgatsby: error:')"
[ "$code" = 2 ] && [ "$(printf '%s\n' "$out" | grep -c "lilgatsby: error: node .*: lilgatsby .* differs from the driver's")" = 1 ] \
    || fail "a worker of other code was not refused in one line: $out"
"$CONTAINER" rm -f lg-test-other >/dev/null

step "clients without the token, with a wrong one, and with it (GCS, lilgatsby sweep, Jobs API)"
mkdir -p "$work/stranger-home"
stranger() {  # a client with no token anywhere (its own empty home), then the environment given
    env -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH -u RAY_AUTH_MODE HOME="$work/stranger-home" "$@"
}
# Ray drivers from the host: refused without the token and with a wrong one (the GCS says
# "Unauthenticated"); with the token the GCS admits the host's client. (A full driver must run the
# cluster's exact Python, so the admitted driver that runs a task runs inside the head container.)
driver="import ray; ray.init(address='127.0.0.1:$ray_port'); print('admitted:', ray.get(ray.remote(lambda: 6 * 7).remote()))"
for who in "no token" "wrong token"; do
    if [ "$who" = "no token" ]; then
        out=$(stranger timeout 120 "$py" -c "$driver" 2>&1 || true)
    else
        out=$(stranger RAY_AUTH_MODE=token RAY_AUTH_TOKEN=0123456789abcdef timeout 120 "$py" -c "$driver" 2>&1 || true)
    fi
    echo "GCS, $who: $(printf '%s\n' "$out" | grep -m1 -o 'Unauthenticated.*') / $(printf '%s\n' "$out" | tail -1)"
    case "$out" in *admitted*) fail "the GCS admitted a driver with $who";; esac
    case "$out" in *Unauthenticated*) ;; *) fail "the driver with $who was not refused for its token";; esac
done
out=$(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$work/token" timeout 60 "$py" -c \
    "from ray._raylet import GcsClient; GcsClient(address='127.0.0.1:$ray_port'); print('admitted')" 2>&1 | tail -1 || true)
echo "GCS, the token, from the host: $out"
[ "$out" = admitted ] || fail "the GCS refused the host's client with the cluster's token: $out"
out=$("$CONTAINER" exec lg-test-head python3 -c "$driver" 2>&1 | tail -1 || true)
echo "a driver with the token, on the head: $out"
[ "$out" = "admitted: 42" ] || fail "a driver with the cluster's token was refused: $out"
set +e
out=$(stranger "$lilgatsby" sweep experiments/smoke_sweep.yaml --address "127.0.0.1:$ray_port" --runs "$work/x" 2>&1)
code=$?
set -e
echo "lilgatsby sweep --address, no token (exit $code): $out"
[ "$code" = 2 ] && [ "$(printf '%s\n' "$out" | grep -c 'lilgatsby: error: .*RAY_AUTH_TOKEN_PATH')" = 1 ] \
    || fail "lilgatsby sweep without the token: expected one line naming RAY_AUTH_TOKEN_PATH and exit 2"
jobs_api() {  # HTTP status of the dashboard's Jobs API, given curl's extra arguments
    curl -s -o /dev/null -w '%{http_code}' "$@" "http://127.0.0.1:$dashboard_port/api/jobs/" || true
}
for _ in $(seq 30); do [ "$(jobs_api -H "Authorization: Bearer $(cat "$work/token")")" = 200 ] && break; sleep 2; done
no_token=$(jobs_api) wrong=$(jobs_api -H "Authorization: Bearer 0123456789abcdef")
with_token=$(jobs_api -H "Authorization: Bearer $(cat "$work/token")")
echo "Jobs API: no token $no_token, wrong token $wrong, the token $with_token"
[ "$no_token" = 401 ] && [ "$wrong" = 403 ] && [ "$with_token" = 200 ] \
    || fail "the Jobs API answered $no_token/$wrong/$with_token (expected 401/403/200)"
"$CONTAINER" rm -f lg-test-head lg-test-worker >/dev/null

step "make cluster-up, docker-sweep, cluster-down (docker/compose.yaml)"
if "$CONTAINER" compose version >/dev/null 2>&1; then
    compose="$CONTAINER compose"
else  # Debian's podman 4.3 has no `compose`: use podman-compose from PyPI
    [ -x build/podman-compose/bin/podman-compose ] || {
        python3 -m venv build/podman-compose && build/podman-compose/bin/pip install --quiet podman-compose==1.6.0; }
    compose=$repo/build/podman-compose/bin/podman-compose
fi
mkdir -p "$work/compose-runs" "$work/compose-data"
cp "$corpus" "$work/compose-data/pg64317.txt"
compose_make() {
    LILGATSBY_RUNS="$work/compose-runs" LILGATSBY_DATA="$work/compose-data" \
        make --no-print-directory "$@" CONTAINER="$CONTAINER" COMPOSE="$compose" IMAGE="$IMAGE"
}
cleanup_compose() { compose_make cluster-down >/dev/null 2>&1 || true; cleanup; }
trap cleanup_compose EXIT
compose_make cluster-up WORKERS=2 RAY_TOKEN_FILE="$work/compose-token"
[ "$(stat -c %a "$work/compose-token")" = 600 ] || fail "the cluster's token file is not private (mode 0600)"
step "the compose cluster's published ports listen on loopback only"
command -v ss >/dev/null && ss -ltn | grep -E ':(8265|6379)\b' || true
published=$("$CONTAINER" ps --format '{{.Names}} {{.Ports}}' | grep ray-head || true)
echo "published: $published"
case "$published" in *127.0.0.1:8265*) ;; *) fail "the dashboard is not published on 127.0.0.1";; esac
case "$published" in *0.0.0.0:*|*"[::]:"*) fail "a port is published on every interface: $published";; esac
host_ip=$(hostname -I | awk '{print $1}')
if [ -n "$host_ip" ] && curl -s -o /dev/null -m 3 "http://$host_ip:8265/"; then
    fail "the dashboard answers on $host_ip, not only on loopback"
fi
compose_make docker-sweep EXP=experiments/smoke_sweep.yaml RAY_TOKEN_FILE="$work/compose-token"
check_index "$work/compose-runs/smoke_sweep/index.jsonl"
step "the host submits a sweep to that cluster as a Ray job (make job-sweep), into the runs volume every node mounts"
compose_make job-sweep EXP=experiments/smoke.yaml RAY_TOKEN_FILE="$work/compose-token"
"$lilgatsby" verify "$work/compose-runs/smoke" | grep -q ': ok$' || fail "the job's run did not verify on the host"
compose_make cluster-down RAY_TOKEN_FILE="$work/compose-token"
[ -s "$work/compose-token" ] || fail "make cluster-down removed the token file"
step "the S3 cluster (docker/compose-s3.yaml): SeaweedFS, a head and two workers, no shared runs volume"
mkdir -p "$work/s3-data"
s3_make() {
    compose_make "$@" S3=1 S3_SECRETS="$work/s3-secrets" BASE_IMAGE="$BASE_IMAGE" S3_IMAGE=localhost/lilgatsby-seaweedfs:test \
        RAY_TOKEN_FILE="$work/compose-token" LILGATSBY_S3_DATA="$work/s3-data" LILGATSBY_LEASE_TTL_S=10
}
cleanup_s3() { s3_make cluster-down >/dev/null 2>&1 || true; cleanup_compose; }
trap cleanup_s3 EXIT
s3_make cluster-up WORKERS=2
[ "$(stat -c %a "$work/s3-secrets")" = 700 ] && [ "$(stat -c %a "$work/s3-secrets/credentials")" = 600 ] \
    || fail "the S3 credentials are not private (directory 0700, files 0600)"
runs_mounts=()  # the image's VOLUME gives each node an anonymous volume of its own at /work/runs
for node in $("$CONTAINER" ps --format '{{.Names}}' | grep -E 'ray-worker'); do
    data=$("$CONTAINER" inspect "$node" \
        --format '{{range .Mounts}}{{if eq .Destination "/work/data"}}{{.Type}}:{{.Source}}{{end}}{{end}}')
    case "$data" in bind:*) fail "$node mounts the host's book directory: $data";; esac
done
for node in $("$CONTAINER" ps --format '{{.Names}}' | grep -E 'ray-(head|worker)'); do
    "$CONTAINER" inspect "$node" --format '{{.Config.Env}}' | grep -q "$(sed -n 's/^aws_secret_access_key = //p' \
        "$work/s3-secrets/credentials")" && fail "$node has the S3 secret in its environment"
    mount=$("$CONTAINER" inspect "$node" \
        --format '{{range .Mounts}}{{if eq .Destination "/work/runs"}}{{.Type}}:{{.Source}}{{end}}{{end}}')
    case "$mount" in bind:*) fail "$node mounts a host directory at /work/runs: $mount";; esac
    runs_mounts+=("$mount")
done
[ -z "$(printf '%s\n' "${runs_mounts[@]}" | sort | uniq -d)" ] || fail "nodes share a runs volume: ${runs_mounts[*]}"
echo "runs directories: one per node (${#runs_mounts[@]} nodes); no worker mounts the book; no node has the S3 secret in its environment"
published=$("$CONTAINER" ps --format '{{.Names}} {{.Ports}}' | grep -E '[-_]s3[-_]' || true)
echo "published: $published"
case "$published" in *127.0.0.1:8333*) ;; *) fail "S3 is not published on 127.0.0.1:8333";; esac
export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_SHARED_CREDENTIALS_FILE="$work/s3-secrets/credentials" \
    AWS_DEFAULT_REGION=us-east-1
s3_make docker-sweep EXP=experiments/smoke_sweep.yaml
"$lilgatsby" pull s3://lilgatsby/runs/smoke_sweep --runs "$work/pulled" --quiet
check_index "$work/pulled/smoke_sweep/index.jsonl"
sweep_run=$("$py" -c "import json, sys; print(next(r['run_id'] for r in map(json.loads, open(sys.argv[1]))
    if r['train.seed'] == 2 and r['train.precision'] == 'fp32'))" "$work/pulled/smoke_sweep/index.jsonl")
step "a run of that sweep against the same run trained on the host (one thread, as Ray gives it)"
"$lilgatsby" train experiments/smoke.yaml --corpus "$corpus" --out "$work/host-s3" --quiet \
    --set train.seed=2 --set train.precision=fp32 --set train.threads=1
"$lilgatsby" compare "$work/host-s3" "s3://lilgatsby/runs/smoke_sweep/$sweep_run" \
    || fail "the S3 cluster's recording differs from the host's"

step "S3 cluster: the same sweep submitted from the host as a Ray job (make job-sweep: the job carries the experiment and the book)"
s3_make job-sweep EXP=experiments/smoke_sweep.yaml JOB_RUNS=s3://lilgatsby/from-host \
    | tee "$work/job-sweep.log"
grep -q "^submitted job lilgatsby-smoke_sweep-" "$work/job-sweep.log" || fail "the host did not submit a job"
"$lilgatsby" pull s3://lilgatsby/from-host/smoke_sweep --runs "$work/from-host" --quiet
check_index "$work/from-host/smoke_sweep/index.jsonl"
"$lilgatsby" compare "$work/host-s3" "s3://lilgatsby/from-host/smoke_sweep/$sweep_run" \
    || fail "the recording of the sweep submitted from the host differs from the host's"
"$py" - "$work/from-host/smoke_sweep/$sweep_run/run.json" <<'PY' || fail "the job's driver did not read the book it carried"
import json, sys
corpus = json.load(open(sys.argv[1]))["corpus"]
assert "/working_dir_files/" in corpus["source"] and not corpus["source"].startswith("/work/data"), corpus["source"]
print(f"the job's driver read the book from its working directory: {corpus['source']}")
PY
jobs=$(curl -s -H "Authorization: Bearer $(cat "$work/compose-token")" http://127.0.0.1:8265/api/jobs/)
case "$jobs" in *lilgatsby-smoke_sweep-*) ;; *) fail "the Jobs API does not list the job";; esac
case "$jobs" in *"$(sed -n 's/^aws_secret_access_key = //p' "$work/s3-secrets/credentials")"*)
    fail "the job's description holds the S3 secret";; esac

step "S3 cluster: the worker training a run is killed (SIGKILL); Ray retries it on the other worker, from the bucket"
long=(--set train.steps=1500 --set train.checkpoint_every=100)
s3_make docker-sweep EXP=experiments/smoke.yaml SWEEP_ARGS="${long[*]}" > "$work/killed-sweep.log" 2>&1 &
sweep_pid=$!
holder=$("$py" - <<'PY' || true
import json, time
import boto3
client, deadline = boto3.client("s3"), time.monotonic() + 300
while time.monotonic() < deadline:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="lilgatsby", Prefix="runs/smoke/").get("Contents", [])]
    checkpoint = next((k for k in keys if k.endswith("/checkpoint.safetensors")), None)
    if checkpoint:
        lease = checkpoint.rsplit("/", 1)[0] + "/.lease"
        print(json.loads(client.get_object(Bucket="lilgatsby", Key=lease)["Body"].read())["host"])
        break
    time.sleep(0.2)
PY
)
[ -n "$holder" ] || { cat "$work/killed-sweep.log"; fail "no checkpoint of the run reached the bucket"; }
echo "a checkpoint is in the bucket; killing the worker that trains the run: $holder"
"$CONTAINER" kill --signal KILL "$holder" >/dev/null
wait "$sweep_pid" || { cat "$work/killed-sweep.log"; fail "the sweep did not complete the run after its worker was killed"; }
tail -3 "$work/killed-sweep.log"
"$lilgatsby" pull s3://lilgatsby/runs/smoke --runs "$work/pulled" --quiet
killed_run=$(ls -d "$work"/pulled/smoke/*/)
"$py" - "$killed_run/run.json" <<'PY' || fail "the run did not resume from its checkpoint in the bucket"
import json, sys
manifest = json.load(open(sys.argv[1]))
assert manifest["status"] == "complete" and manifest["resumed_from_step"] >= 100, manifest.get("resumed_from_step")
print(f"resumed from step {manifest['resumed_from_step']} on another worker; complete")
PY
"$lilgatsby" train experiments/smoke.yaml --corpus "$corpus" --out "$work/host-long" --quiet "${long[@]}" \
    --set train.threads=1
"$lilgatsby" compare "$work/host-long" "$killed_run" || fail "the resumed run differs from an uninterrupted one"
s3_make cluster-down
step "done"
echo "test-container: 12 passed, 0 failed"
