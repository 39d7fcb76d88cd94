#!/usr/bin/env bash
# The base image for machines that cannot pull one: a minimal Debian with Python 3, debootstrapped from the Debian
# mirror that apt on this machine already uses, imported into podman as cifar10-base:<suite>. The root filesystem
# is kept as a tarball in docker/.cache/, so a later run only imports it.
# Usage: docker/base-image.sh   (prints the image's name; needs root, debootstrap and podman)
set -euo pipefail
. /etc/os-release
suite=$VERSION_CODENAME
arch=$(dpkg --print-architecture)
image=cifar10-base:$suite
cache=$(cd "$(dirname "$0")" && pwd)/.cache
tarball=$cache/debian-$suite-$arch.tar

if ! podman image inspect "$image" >/dev/null 2>&1; then
  if [[ ! -f $tarball ]]; then
    # the mirror of the suite's main component, as apt knows it (sources.list or deb822 .sources alike)
    mirror=$(apt-cache policy | awk -v s="$suite/main" '$3 == s {print $2; exit}')
    [[ -n $mirror ]] || { echo "base-image.sh: apt knows no mirror for $suite/main; run apt-get update" >&2; exit 1; }
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root" "$tarball.tmp"' EXIT
    echo "base-image.sh: debootstrap $suite from $mirror (about a minute)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root" "$mirror" >&2
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
  fi
  podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
fi
echo "$image"
