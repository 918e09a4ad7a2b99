# Shared set-up for the examples: a temp state dir, PATH with the venv, cleanup traps.
# Source it; it defines start_controller, start_mount MNT [args] and cleans up on exit.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$HERE/.venv/bin:$PATH"
WORK=$(mktemp -d /tmp/virtfs-example.XXXXXX)
export VIRTFS_STATE_DIR=$WORK/state
PIDS=()
MOUNTS=()
LOOPS=()
cleanup() {
    set +e
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    for m in "${MOUNTS[@]}"; do fusermount3 -u -z "$m" 2>/dev/null; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() {  # wait_for CMD...: up to 20 s
    for _ in $(seq 200); do "$@" && return 0; sleep 0.1; done
    echo "timed out: $*" >&2; return 1
}

start_controller() {
    virtfs-controller --state-dir "$VIRTFS_STATE_DIR" 2>>"$WORK/controller.log" &
    PIDS+=($!)
    wait_for test -S "$VIRTFS_STATE_DIR/controller.sock"
}

start_mount() {  # start_mount MNT [virtfs-mount args...]
    local mnt=$1; shift
    mkdir -p "$mnt"
    virtfs-mount "$mnt" --state-dir "$VIRTFS_STATE_DIR" "$@" 2>>"$WORK/mount-$(basename "$mnt").log" &
    PIDS+=($!)
    MOUNTS+=("$mnt")
    wait_for mountpoint -q "$mnt"
}
