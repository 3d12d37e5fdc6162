#!/usr/bin/env bash
# mmdebstrap customize hook of images/rootfs.sh (runs on the host, as root, with the tree at $1).
# Args: ROOTFS WHEELDIR WHEEL LOCK VENV UID
set -euo pipefail
rootfs="$1" wheels="$2" wheel="$3" lock="$4" venv="$5" uid="$6"

mkdir -p "$rootfs/tmp/wheels"
cp "$wheels"/* "$rootfs/tmp/wheels/"
in_root() { chroot "$rootfs" "$@"; }

# The venv without pip; Debian's own pip wheel (python3-pip-whl) installs into it, offline.
in_root /usr/bin/python3.11 -m venv --without-pip "$venv"
pip_whl="$(cd "$rootfs" && ls usr/share/python-wheels/pip-*.whl)"
pip() { in_root "$venv/bin/python" "/$pip_whl/pip" --disable-pip-version-check --no-cache-dir "$@"; }
pip install -q --no-index --find-links /tmp/wheels --no-deps --only-binary=:all: -r "/tmp/wheels/$lock"
pip install -q --no-index --no-deps "/tmp/wheels/$wheel"
pip check
rm -rf "$rootfs/tmp/wheels"

# What made the venv is not needed to run it: pip's and setuptools' wheels go with their packages.
in_root dpkg --purge python3.11-venv python3-pip-whl python3-setuptools-whl >/dev/null

# The numeric user of the Containerfiles (distroless' "nonroot"), without a home or a shell.
echo "gpufleet:x:$uid:$uid:gpufleet:/nonexistent:/usr/sbin/nologin" >>"$rootfs/etc/passwd"
echo "gpufleet:x:$uid:" >>"$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
# Where the manifests mount the config (a ConfigMap): present, so a read-only root needs no mkdir.
mkdir -p "$rootfs/etc/gpufleet"
# Logs and caches of the build itself.
rm -rf "$rootfs"/var/log/* "$rootfs"/var/cache/* "$rootfs"/var/lib/apt/lists/* 2>/dev/null || true
