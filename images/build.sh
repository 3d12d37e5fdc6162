#!/usr/bin/env bash
# `make images`: build the router and controller images with docker or podman, tagged with the
# package version (infra/version.py). Environment:
#   REGISTRY=...         image repository prefix (default: the project's, see infra/version.py)
#   CONTAINER_RUNTIME=   docker | podman (default: the first one present that works)
#   PUSH=1               push both tags after building
#   IMAGES="router"      build a subset
set -euo pipefail
cd "$(dirname "$0")/.."

version_py=infra/version.py
VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$version_py")"
DEFAULT_REGISTRY="$(sed -n 's/^IMAGE_REGISTRY = "\(.*\)"$/\1/p' "$version_py")"
REGISTRY="${REGISTRY:-$DEFAULT_REGISTRY}"
REGISTRY="${REGISTRY%/}"
[ -n "$VERSION" ] || { echo "images/build.sh: no __version__ in $version_py" >&2; exit 1; }

runtime="${CONTAINER_RUNTIME:-}"
if [ -z "$runtime" ]; then
  for candidate in podman docker; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    # A docker CLI without a reachable daemon cannot build; say so rather than fail half-way.
    if "$candidate" info >/dev/null 2>&1; then runtime="$candidate"; break; fi
    echo "images/build.sh: $candidate is installed but not usable ($candidate info failed)" >&2
  done
fi
if [ -z "$runtime" ]; then
  cat >&2 <<MSG
images/build.sh: no working container runtime: install docker (with its daemon running) or
podman, or set CONTAINER_RUNTIME. Without one, \`make image-rootfs\` builds the same router image
filesystem and an OCI archive from Debian packages (mmdebstrap + umoci), see images/README.md.
MSG
  exit 1
fi

revision="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
for name in ${IMAGES:-router controller}; do
  tag="$REGISTRY/gpufleet-$name:$VERSION"
  echo "building $tag with $runtime"
  "$runtime" build -f "images/$name/Containerfile" \
    --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" \
    -t "$tag" .
  if [ "${PUSH:-0}" = 1 ]; then
    "$runtime" push "$tag"
  fi
done
