#!/usr/bin/env bash
# Build pyfuse3 from its PyPI sdist with virtfs's patches (third_party/pyfuse3/:
# fallocate.patch, then lseek.patch) and install it into a venv.
#
# Usage: scripts/build-pyfuse3.sh [VENV_PYTHON]     (default: .venv/bin/python)
#
# Idempotent: does nothing if the installed pyfuse3 already carries both patches.
# Needs: network access to PyPI, a C compiler, pkg-config and libfuse3-dev.
set -euo pipefail

PYFUSE3_VERSION=3.5.0
# Installed as a PEP 440 local version, so `pip list` shows the patched build.
# It still satisfies virtfs's `pyfuse3>=3.3` requirement.
LOCAL_VERSION="${PYFUSE3_VERSION}+virtfs.fallocate.lseek"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PATCHES=("$ROOT/third_party/pyfuse3/fallocate.patch" "$ROOT/third_party/pyfuse3/lseek.patch")
PY="${1:-.venv/bin/python}"
# Keep the venv path as given (no symlink resolution: that would leave the venv).
[[ "$PY" == /* ]] || PY="$PWD/$PY"

msg() { echo "build-pyfuse3: $*" >&2; }
die() { msg "ERROR: $*"; exit 1; }

[[ -x "$PY" ]] || die "venv python '$PY' not found or not executable"
for p in "${PATCHES[@]}"; do [[ -f "$p" ]] || die "patch file $p is missing"; done

# Both halves of each patch must be present: the pure-Python defaults
# Operations.fallocate/lseek and the compiled C callbacks (whose async halves'
# names end up as string constants in the extension module).
is_patched() {
    "$PY" - <<'EOF' 2>/dev/null
import pathlib, sys
import pyfuse3
ext = pathlib.Path(pyfuse3.__file__).read_bytes()
for name in ("fallocate", "lseek"):
    if not hasattr(pyfuse3.Operations, name) or f"fuse_{name}_async".encode() not in ext:
        sys.exit(1)
EOF
}

if is_patched; then
    msg "pyfuse3 in $PY already has the fallocate and lseek patches; nothing to do"
    exit 0
fi

msg "pyfuse3 with fallocate and lseek support not found in $PY; building $PYFUSE3_VERSION from source"

# Build prerequisites that pip cannot provide.
command -v pkg-config >/dev/null || die "pkg-config not found (apt-get install pkg-config)"
pkg-config --exists fuse3 || die "libfuse3 development files not found (apt-get install libfuse3-dev)"
command -v "${CC:-cc}" >/dev/null || die "no C compiler found (apt-get install gcc)"
command -v patch >/dev/null || die "'patch' not found (apt-get install patch)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/build-pyfuse3.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

msg "downloading pyfuse3==$PYFUSE3_VERSION sdist"
# --no-binary pyfuse3 (not :all:): the sdist is what we patch, while its build requirements
# (Cython, setuptools) come as wheels; with :all: pip compiles Cython from source (minutes).
"$PY" -m pip download -q --no-binary pyfuse3 --no-deps -d "$TMP" "pyfuse3==$PYFUSE3_VERSION"
SDIST="$TMP/pyfuse3-$PYFUSE3_VERSION.tar.gz"
[[ -f "$SDIST" ]] || die "expected $SDIST after pip download"
tar -xzf "$SDIST" -C "$TMP"
SRC="$TMP/pyfuse3-$PYFUSE3_VERSION"

for p in "${PATCHES[@]}"; do
    msg "applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --batch --quiet < "$p" || die "$(basename "$p") did not apply cleanly"
done

# The sdist ships a pre-generated src/pyfuse3/__init__.c from the unpatched
# .pyx. The build backend lists __init__.pyx as the extension source, so
# setuptools cythonizes it when Cython is available; deleting the stale .c
# guarantees the C is regenerated from the patched sources (and makes the
# build fail loudly instead of compiling old code if Cython were missing).
rm -f "$SRC/src/pyfuse3/__init__.c"

# Build with pip's build isolation: pip installs the sdist's build-system
# requirements (setuptools>=78.1.1, setuptools_scm>=8.0, Cython) from PyPI
# into a throwaway build environment, so the venv's own setuptools is not
# touched. --force-reinstall because an unpatched 3.5.0 may already be installed;
# --no-deps so trio etc. are left as they are.
msg "building and installing patched pyfuse3 (Cython + C compile, takes a minute)"
start=$SECONDS
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3="$LOCAL_VERSION" \
    "$PY" -m pip install -q --force-reinstall --no-deps --no-cache-dir "$SRC"
msg "build took $((SECONDS - start))s"

# Import from a neutral directory so nothing in the cwd shadows the package.
if (cd "$TMP" && is_patched); then
    msg "installed pyfuse3 $LOCAL_VERSION with fallocate and lseek support into $PY"
else
    die "pyfuse3 was installed but the patches are not visible in it"
fi
