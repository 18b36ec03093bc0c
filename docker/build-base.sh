#!/usr/bin/env bash
# Build a Debian bookworm base image with python3.11 + venv locally (for hosts that reach a Debian
# mirror but no container registry): debootstrap into build/base-rootfs, then import it.
#   docker/build-base.sh IMAGE [CONTAINER]
set -euo pipefail
image=${1:?usage: build-base.sh IMAGE [podman|docker]}
container=${2:-podman}
repo=$(cd "$(dirname "$0")/.." && pwd)
rootfs=$repo/build/base-rootfs
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "build-base: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
fi
tar -C "$rootfs" -c . | "$container" import --change 'CMD ["/bin/bash"]' - "$image"
