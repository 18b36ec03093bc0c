#!/usr/bin/env bash
# make test-container: build the image on this machine (local Debian base, host wheelhouse), then in
# containers run the smoke experiment (bitwise equal to the same run on the host), the smoke sweep
# (local Ray inside), and the smoke sweep on a Ray cluster of a head and a worker container; check
# every result on the host.
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
cleanup() { "$CONTAINER" rm -f lg-test-head lg-test-worker >/dev/null 2>&1 || true; rm -rf "$work"; }
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

step "smoke sweep on a Ray cluster: head + worker containers"
ray_port=6391
cluster_node() {  # name, ray start arguments...
    local name=$1; shift
    "$CONTAINER" run -d --name "$name" --network host --user "$(id -u):$(id -g)" -v "$work/runs:/work/runs" \
        -v "$corpus:/work/data/pg64317.txt:ro" -e LILGATSBY_CORPUS=/work/data/pg64317.txt \
        --entrypoint ray "$IMAGE" start --block --num-cpus 1 --disable-usage-stats "$@" >/dev/null
}
cluster_node lg-test-head --head --port "$ray_port" --include-dashboard false
cluster_node lg-test-worker --address "127.0.0.1:$ray_port"
for _ in $(seq 60); do
    nodes=$("$CONTAINER" exec lg-test-head python3 -c \
        "import ray; ray.init(address='127.0.0.1:$ray_port', logging_level='ERROR'); print(len([n for n in ray.nodes() if n['Alive']]))" 2>/dev/null || true)
    [ "$nodes" = 2 ] && break
    sleep 2
done
[ "$nodes" = 2 ] || fail "the worker did not join the head (nodes: ${nodes:-none})"
"$CONTAINER" exec lg-test-head lilgatsby sweep /opt/lilgatsby/experiments/smoke_sweep.yaml \
    --address "127.0.0.1:$ray_port" --runs /work/runs/cluster --quiet
check_index "$work/runs/cluster/smoke_sweep/index.jsonl"
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
compose_make cluster-up WORKERS=2
compose_make docker-sweep EXP=experiments/smoke_sweep.yaml
check_index "$work/compose-runs/smoke_sweep/index.jsonl"
compose_make cluster-down
step "done"
echo "test-container: 4 passed, 0 failed"
