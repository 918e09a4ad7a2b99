#!/usr/bin/env bash
# Import a raw image into the mount with cp and qemu-img, export it again, compare.
source "$(dirname "$0")/common.sh"
start_mount "$WORK/mnt" --default-container-size 8G
qemu-img create -q -f qcow2 "$WORK/src.qcow2" 256M
qemu-io -f qcow2 -c 'write -P 0xab 1M 4M' -c 'write -P 0x5a 200M 1M' "$WORK/src.qcow2" >/dev/null
qemu-img convert -f qcow2 -O raw "$WORK/src.qcow2" "$WORK/mnt/vm"       # import (qcow2 -> disk)
qemu-img compare -f qcow2 -F raw "$WORK/src.qcow2" "$WORK/mnt/vm"
cp "$WORK/mnt/vm" "$WORK/export.raw"                                   # export with cp
qemu-img compare -f raw -F raw "$WORK/export.raw" "$WORK/mnt/vm"
vdctl disk map vm            # only the segments qemu-img wrote are allocated
echo "import/export: OK"
