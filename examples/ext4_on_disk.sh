#!/usr/bin/env bash
# An ext4 filesystem on a thin virtual disk, through a loop device.
source "$(dirname "$0")/common.sh"
start_mount "$WORK/mnt" --default-container-size 8G      # embedded controller
truncate -s 1G "$WORK/mnt/fs"                             # a new thin disk
mkfs.ext4 -q -F -E nodiscard "$WORK/mnt/fs"
LOOP=$(losetup -f --show "$WORK/mnt/fs"); LOOPS+=("$LOOP")
mkdir "$WORK/ext4"
mount "$LOOP" "$WORK/ext4"
cp -r /usr/share/doc/fio "$WORK/ext4/" 2>/dev/null || echo hello > "$WORK/ext4/hello"
dd if=/dev/urandom of="$WORK/ext4/blob" bs=1M count=32 status=none
umount "$WORK/ext4"
losetup -d "$LOOP"; LOOPS=()
e2fsck -fn "$WORK/mnt/fs"
vdctl disk info fs
echo "ext4 on a virtual disk: OK"
