#!/usr/bin/env bash
# Install the Debian packages virtfs needs to build, run and test, if any are missing.
# Usage: scripts/sysdeps.sh [--bench]   (--bench: also what `make bench` measures against)
set -euo pipefail
PKGS=(fuse3 libfuse3-dev pkg-config gcc patch python3-venv fio qemu-utils e2fsprogs strace util-linux
      iproute2 procps rsync openssl
      systemd  # systemd-analyze: tests/process/test_services.py verifies examples/systemd/
      etcd-server)  # the controller group's engine (docs/ha.md); tests start their own members
# `make bench` also needs its peer, qemu-storage-daemon (in qemu-system-common)
[[ "${1:-}" == "--bench" ]] && PKGS+=(qemu-system-common)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3-venv only matters when the interpreter the venv is made with ($PY, as in the
# Makefile; default python3) is Debian's own and lacks venv
if [[ " ${missing[*]:-} " == *" python3-venv "* ]] && "${PY:-python3}" -c 'import venv, ensurepip' 2>/dev/null; then
    missing=("${missing[@]/python3-venv}")
fi
read -ra missing <<<"${missing[*]:-}"
if ((${#missing[@]})); then
    echo "sysdeps: installing ${missing[*]}" >&2
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
        # the package enables and starts an etcd of its own (on 127.0.0.1:2379 where an init
        # is running); nothing here uses it: tests start members on free ports. Stop it.
        if [[ -d /run/systemd/system ]]; then
            $SUDO systemctl disable --now etcd.service >/dev/null 2>&1 || true
        elif [[ -x /etc/init.d/etcd ]]; then
            $SUDO /etc/init.d/etcd stop >/dev/null 2>&1 || true
            $SUDO update-rc.d etcd disable >/dev/null 2>&1 || true
        fi
    fi
fi
