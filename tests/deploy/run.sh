#!/usr/bin/env bash
# `make test-deploy`: prepare this machine (tests/deploy/prepare.sh), then build and run the compose
# CPU profile and check it from the host (tests/deploy/test_compose.py). Extra arguments go to pytest.
#
# On a Docker host, skip the preparation and point the tests at Docker instead:
#   CONTAINER_ENGINE=docker COMPOSE="docker compose" .venv/bin/pytest -m deploy tests/deploy
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
tests/deploy/prepare.sh
# shellcheck source=/dev/null
. "${STOPGATE_DEPLOY_DIR:-/var/tmp/stopgate-deploy}/env"
echo "[test-deploy] machine prepared in $((SECONDS - start)) s"
export CONTAINER_ENGINE=podman COMPOSE="$PODMAN_COMPOSE"
# Podman writes OCI images unless told otherwise, and the OCI format has no HEALTHCHECK.
export BUILDAH_FORMAT=docker
status=0
.venv/bin/pytest -m deploy tests/deploy -p no:cacheprovider -s "$@" || status=$?
echo "[test-deploy] total $((SECONDS - start)) s"
exit $status
