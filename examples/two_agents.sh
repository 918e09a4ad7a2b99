#!/usr/bin/env bash
# Two agents (two mounts, as two hosts would have) on one disk, one controller.
source "$(dirname "$0")/common.sh"
start_controller
vdctl container add pool "$WORK/pool.img" --size 4G
vdctl disk create shared --size 256M
start_mount "$WORK/a"
start_mount "$WORK/b"
vdctl agent ls
dd if=/dev/urandom of="$WORK/data" bs=1M count=8 status=none
dd if="$WORK/data" of="$WORK/a/shared" bs=1M oflag=direct conv=notrunc,fsync status=none
cmp <(dd if="$WORK/b/shared" bs=1M count=8 iflag=direct status=none) "$WORK/data"
echo "written through agent a, read back through agent b: OK"
