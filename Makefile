# Two commands on a fresh clone: `make train` and `make test`. Both first build .venv from
# requirements.lock (once; again only when the lock or pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready
# Extra installer arguments, which uv and pip both take, e.g. PIP_ARGS="--extra-index-url <an
# index>". The index settings pip is configured with (pip.conf, PIP_* variables) apply to both.
PIP_ARGS ?=

.PHONY: setup train test test-all lint format lock clean

setup: $(READY)

# uv installs the lock in seconds once its cache is warm (tools/uv_install.py: uv from PATH or
# installed into .venv, with pip's index settings); pip, several times slower, if uv fails.
# Where PYTHONDONTWRITEBYTECODE is set (as on the machines this project is tested on), Python
# never caches what it compiles, and every process would compile torch anew (28 s to import
# torch and Lightning instead of 12): uv then writes the bytecode at install, as pip always
# does (about 35 s more on two cores). Elsewhere Python caches it on first use.
COMPILE := $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode)
$(READY): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if $(BIN)/python tools/uv_install.py $(PIP_ARGS) $(COMPILE) -r requirements.lock \
		&& $(BIN)/python tools/uv_install.py --no-deps --no-build-isolation -e .; then :; else \
		echo "uv failed: installing with pip instead"; \
		$(BIN)/python -m pip install --quiet --progress-bar off $(PIP_ARGS) -r requirements.lock 2>&1 | { grep -v "is ignored: it is neither" || true; }; \
		$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .; \
	fi
	@# the versions installed, read from the packages' metadata (importing torch takes seconds)
	$(BIN)/python -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'lightning')))"
	touch $@

# The default experiment: an MLP on scikit-learn's bundled digits, offline. ARGS adds overrides.
train: $(READY)
	$(BIN)/python -m trainlab.train $(ARGS)

# The fast suite (under 5 minutes on two cores); `make test-all` adds the slow tests. WORKERS
# test processes share the work, a test file to each at a time (its module fixtures run once);
# WORKERS=0 runs it in this process.
WORKERS ?= 2
test: $(READY)
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadscope $(ARGS)

test-all: $(READY)
	$(BIN)/python -m pytest -m "" -n $(WORKERS) --dist loadscope $(ARGS)

lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(READY)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-pin after changing dependencies in pyproject.toml: install them into .venv, then run this.
lock:
	{ sed -n '1,2p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
