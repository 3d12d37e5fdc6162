#!/usr/bin/env bash
# `make image-rootfs`: the router (and controller) image built without a container runtime or a
# base image from a registry. mmdebstrap lays a Debian bookworm root filesystem from Debian's own
# packages (python3.11, python3.11-venv, ca-certificates, libstdc++6), the locked wheels and the project's
# wheel are installed offline into the same venv as the Containerfiles' (/opt/gpufleet), and umoci
# packs the tree as an OCI image (entrypoint, user 65532, labels) in an OCI archive.
#
# Environment:
#   OUT=build/images       where rootfs/, the OCI layout and the archives go
#   IMAGES="router controller"
#   PYTHON=.venv/bin/python  a Python 3.11 with pip (builds the wheel, downloads the locked wheels)
#   MIRROR=http://deb.debian.org/debian
# Needs root (or fakeroot-less mmdebstrap modes are not used: chroot runs pip inside the tree).
# Writes, per image NAME: $OUT/NAME/rootfs/ and $OUT/gpufleet-NAME-VERSION.oci.tar
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

OUT="${OUT:-build/images}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-.venv/bin/python}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' infra/version.py)"
SOURCE="$(sed -n 's/^SOURCE_URL = "\(.*\)"$/\1/p' infra/version.py)"
REVISION="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
UID_GID=65532
# Wheels an interpreter on bookworm (glibc 2.36, x86_64) can load: pip expands no manylinux tag
# to the older ones, so every one is listed.
PLATFORMS="$(for m in $(seq 36 -1 17); do printf -- '--platform manylinux_2_%s_x86_64 ' "$m"; done)"
PLATFORMS="$PLATFORMS --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64"
VENV=/opt/gpufleet

say() { printf '[image-rootfs %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'image-rootfs: %s\n' "$*" >&2; exit 1; }

for tool in mmdebstrap umoci; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (Debian: apt-get install mmdebstrap umoci)"
done
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap's root mode and chroot)"
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || die "no Python at $PYTHON (run make install)"

# 1. The project's wheel, built from a clean copy of the sources (a stale build/lib in the work
#    tree would leak deleted modules into the wheel).
work="$(mktemp -d "$OUT/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "building the gpufleet $VERSION wheel"
mkdir -p "$work/src" "$work/dist"
# The tree less what .dockerignore keeps from the Containerfiles' builds.
tar -C "$ROOT" $(grep -v '^#' .dockerignore | sed -n 's/^\(.\+\)$/--exclude=\1/p') -cf - . | tar -C "$work/src" -xf -
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$work/src" >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log" >&2; die "could not build the wheel"; }
wheel="$(ls "$work/dist"/gpufleet-"$VERSION"-*.whl)"

for name in ${IMAGES:-router controller}; do
  lock="images/locks/$name.txt"
  [ -f "$lock" ] || die "no lock $lock (images: router, controller)"
  case "$name" in
    router) cmd='["router","serve","--config","/etc/gpufleet/router.yaml","--host","0.0.0.0"]'; port=8080/tcp
            title="gpufleet's KV-cache-aware router for vLLM and SGLang replicas" ;;
    controller) cmd='["controller","run","--config","/etc/gpufleet/plan.json","--metrics-host","0.0.0.0"]'; port=9102/tcp
            title="gpufleet's warm-capacity and failover controller" ;;
    *) die "unknown image $name" ;;
  esac

  # 2. The locked wheels for the image's interpreter (CPython 3.11 on glibc 2.36, bookworm's),
  #    fetched here so the install inside the tree runs with --no-index.
  say "$name: downloading the $(grep -c '==' "$lock") locked wheels"
  wheels="$work/wheels-$name"
  # Every line, marker or not: the markers are evaluated by the image's Python at install time.
  sed 's/ *;.*//' "$lock" >"$work/all-$name.txt"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$wheels" \
    --implementation cp --python-version 3.11 --abi cp311 $PLATFORMS -r "$work/all-$name.txt" >>"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log" >&2; die "$name: could not download the locked wheels"; }
  cp "$wheel" "$lock" "$wheels/"

  # 3. The root filesystem. essential: no apt, no perl beyond perl-base; docs, man pages and
  #    locales are never unpacked. libstdc++6: the C++ runtime the tokenizers and pyzmq wheels
  #    load (the Containerfiles' debian-slim base has it through apt). The hook installs the venv offline as the image's own Python,
  #    adds the numeric user and removes the venv-making packages again (pip's wheels included).
  rootfs="$OUT/$name/rootfs"
  rm -rf "$OUT/$name"
  mkdir -p "$OUT/$name"
  say "$name: mmdebstrap bookworm (python3.11, python3.11-venv, ca-certificates, libstdc++6)"
  SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)" \
  mmdebstrap --mode=root --variant=essential --quiet \
    --include=python3.11,python3.11-venv,ca-certificates,libstdc++6 \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="bash '$ROOT/images/rootfs-hook.sh' \"\$1\" '$wheels' '$(basename "$wheel")' '$name.txt' '$VENV' '$UID_GID'" \
    bookworm "$rootfs" "$MIRROR"

  # 4. The OCI image: one layer from the tree, then the config the Containerfiles also set.
  layout="$OUT/oci-$name"
  tag="$VERSION"
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  bundle="$work/bundle-$name"
  umoci unpack --image "$layout:$tag" "$bundle" >/dev/null
  cp -a "$rootfs/." "$bundle/rootfs/"
  umoci repack --image "$layout:$tag" "$bundle" >/dev/null
  rm -rf "$bundle"
  umoci config --image "$layout:$tag" \
    --os linux --architecture amd64 \
    --config.user "$UID_GID:$UID_GID" \
    --config.workingdir /tmp \
    --config.env "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 --config.env HOME=/tmp \
    --config.entrypoint "$VENV/bin/gpufleet" \
    $(printf -- '--config.cmd %s ' $(echo "$cmd" | tr -d '[]"' | tr ',' ' ')) \
    --config.exposedports "$port" \
    --config.stopsignal SIGTERM \
    --config.label "org.opencontainers.image.title=gpufleet-$name" \
    --config.label "org.opencontainers.image.description=$title" \
    --config.label "org.opencontainers.image.version=$VERSION" \
    --config.label "org.opencontainers.image.revision=$REVISION" \
    --config.label "org.opencontainers.image.source=$SOURCE" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --config.label "org.opencontainers.image.base.name=debian:bookworm (mmdebstrap)"
  umoci gc --layout "$layout"
  archive="$OUT/gpufleet-$name-$VERSION.oci.tar"
  tar -C "$layout" -cf "$archive" .
  say "$name: rootfs $(du -sm "$rootfs" | cut -f1) MiB, OCI archive $(du -sm "$archive" | cut -f1) MiB: $archive"
done
