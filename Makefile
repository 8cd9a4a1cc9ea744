# One set-up command each: `make test` and `make demo` create or refresh ./.venv before they run.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
PY     := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: test test-fast demo venv clean

venv: $(STAMP)

# Re-install only when the project's metadata changed (or the venv is new).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,mmdet,ray,s3]'
	touch $(STAMP)

# Everything: the default suite plus the tests marked slow (real multi-process runs).
test: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# The default suite only (what plain `pytest` runs).
test-fast: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/roicache demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
