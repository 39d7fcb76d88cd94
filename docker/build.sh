#!/usr/bin/env bash
# Build a cifar10 image with this machine's setup, for machines that reach a package index but no image registry:
# the base image debootstrapped from apt's mirror (docker/base-image.sh; BASE=IMAGE to use another), pip's index
# from pip's own configuration (local index folders mounted read-only into the build), and the machine's extra
# certificate authorities, which pip inside the build must trust.
# Usage: docker/build.sh TARGET TAG [PODMAN BUILD OPTIONS...]    TARGET: server, training or postgres (docker/Dockerfile)
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: docker/build.sh server|training|postgres TAG [podman build options...]" >&2; exit 2; }
target=$1 tag=$2; shift 2
docker_dir=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$docker_dir")
base=${BASE:-$("$docker_dir/base-image.sh")}

# the certificate authorities that Debian's update-ca-certificates adds to the system's (the context copy is
# git-ignored)
find "$docker_dir/ca-certificates" -name '*.crt' -delete
if [[ -d /usr/local/share/ca-certificates ]]; then
  cp -r /usr/local/share/ca-certificates/. "$docker_dir/ca-certificates/"
fi

# pip's effective index settings: `pip config list` shows each key once, with the value that wins among the
# configuration files; a PIP_* variable (:env:) beats the [install] section, which beats [global]
mapfile -t pip_args < <(python3 - <<'EOF'
import os, subprocess, sys
listed = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], capture_output=True, text=True).stdout
config = dict(line.split('=', 1) for line in listed.splitlines() if '=' in line)
mounts = set()
for name in ('index-url', 'extra-index-url', 'find-links', 'trusted-host'):
    value = next((config[f'{section}.{name}'] for section in (':env:', 'install', 'global')
                  if f'{section}.{name}' in config), '').strip("'\"")
    kept = []
    for entry in value.split():
        local = entry.removeprefix('file://')
        if entry.startswith('file://') or entry.startswith('/'):
            # a local index or wheel folder: mounted where it is (an index with its parent, where its files lie)
            if not os.path.isdir(local): continue
            mounts.add(os.path.dirname(local.rstrip('/')) if 'index-url' in name else local)
        kept.append(entry)
    if kept: print(f'--build-arg=PIP_{name.upper().replace("-", "_")}={" ".join(kept)}')
for folder in sorted(mounts): print(f'--volume={folder}:{folder}:ro')
EOF
)

cd "$root"
# --format docker: podman writes OCI images by default, which have no HEALTHCHECK
podman build --format docker -f docker/Dockerfile --target "$target" --build-arg "BASE=$base" "${pip_args[@]}" \
  -t "$tag" "$@" .
