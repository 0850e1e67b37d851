# The two commands of the README. Each creates .venv from the pinned versions when missing.
#   make demo   train + evaluate an SA network on the bundled digits (a few minutes, CPU)
#   make test   build the fused kernels and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sanet-installed
# The venv's tools first for everything the recipes start: torch.utils.cpp_extension runs
# `ninja` (installed into .venv/bin by pip) from PATH, and the venv need not be activated.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test ext bench clean

$(STAMP): pyproject.toml constraints.txt
	@# (re)created when missing, broken (no pip: an interrupted creation) or older than 3.11
	@$(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
		|| $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Build the C++ kernels now (cached), failing loudly instead of falling back.
ext: $(STAMP)
	SANET_REQUIRE_EXT=1 $(BIN)/sanet ext

test: ext
	SANET_REQUIRE_EXT=1 $(BIN)/python -m pytest -q

demo: ext
	$(BIN)/python -m sanet.demo

bench: ext
	$(BIN)/sanet bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
