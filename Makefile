# virtfs: `make run` mounts ./mnt with an embedded controller; `make test` runs the suite.
# Both set everything up on a fresh Debian machine (apt packages, a venv with the project).
# PY: the interpreter to build the venv with; `make test PY=python3.13` runs the suite on
# another Python, in a venv of its own (.venv-python3.13), beside the default .venv
PY      ?= python3
VENV    ?= $(if $(filter python3,$(PY)),.venv,.venv-$(notdir $(PY)))
BIN     := $(VENV)/bin
STATE   ?= $(CURDIR)/state
MNT     ?= $(CURDIR)/mnt
PYTEST_ARGS ?=

.PHONY: all setup sysdeps bytecode run controller test soak lint typecheck bench torture clean

all: test

sysdeps:
	@PY=$(PY) bash scripts/sysdeps.sh

# pip builds the patched pyfuse3 from third_party/pyfuse3 (setup.py names it as the dependency)
$(BIN)/.installed: pyproject.toml setup.py $(wildcard third_party/pyfuse3/*) | sysdeps
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: sysdeps $(BIN)/.installed

run: setup
	mkdir -p $(MNT)
	VIRTFS_STATE_DIR=$(STATE) $(BIN)/virtfs-mount $(MNT) --demo

controller: setup
	VIRTFS_STATE_DIR=$(STATE) $(BIN)/virtfs-controller

# the sources as bytecode (__pycache__), written even where PYTHONDONTWRITEBYTECODE is set:
# the tests start a process for every vdctl call, controller and agent, and each would
# otherwise compile every module it imports (about 80 ms for vdctl, 300 ms for a controller)
bytecode: setup
	$(BIN)/python -m compileall -q controller virtfs tests bench > /dev/null

# the suite without the soak tests (marked slow: scale and long fault runs), in two phases:
# the tests not marked serial on two workers (pytest-xdist), then the serial ones alone
# (tests/conftest.py says which and why); both run even if the first fails, and a phase
# that PYTEST_ARGS leaves empty (pytest's exit status 5) is no failure
WORKERS ?= 2
test: setup bytecode
	@rc=0; \
	$(BIN)/pytest -q -m "not slow and not serial" -n $(WORKERS) --dist worksteal $(PYTEST_ARGS) \
	    || { r=$$?; [ $$r = 5 ] || rc=$$r; }; \
	$(BIN)/pytest -q -m "serial and not slow" $(PYTEST_ARGS) || { r=$$?; [ $$r = 5 ] || rc=$$r; }; \
	exit $$rc

# the soak tests only (pytest -m slow), then a torture run of OPS operations
soak: setup bytecode
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)
	$(MAKE) torture

lint: setup
	$(BIN)/ruff check controller virtfs tests bench

typecheck: setup
	$(BIN)/mypy controller virtfs

bench: setup bytecode
	@PY=$(PY) bash scripts/sysdeps.sh --bench
	$(BIN)/python -m bench.run

# a long model-based torture run (tests/multihost/torture.py); a failure prints the seed and the
# last operations. SEED defaults to a random one (printed); DIR keeps the work dir there.
SEED ?=
OPS  ?= 20000
torture: setup
	$(BIN)/python tests/multihost/torture.py --ops $(OPS) $(if $(SEED),--seed $(SEED)) \
	    $(if $(DIR),--dir $(DIR) --keep)

clean:
	rm -rf .venv .venv-* build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
