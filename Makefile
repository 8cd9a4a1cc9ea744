# One set-up command each: `make test` and `make demo` create or refresh ./.venv before they run.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
PY     := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: test test-slow demo venv clean

venv: $(STAMP)

# Re-install only when the project's metadata changed (or the venv is new).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The slow end-to-end tests (real training/extraction on a tiny benchmark).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/roicache demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
