# Two commands for a new machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: demo test clean

# (re)install when pyproject.toml changes; a stamp marks a finished install of an extra.
# The demo needs the training stage (toolkit[train]); the tests need everything (toolkit[dev]).
$(VENV)/.train: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[train]'
	touch $@

$(VENV)/.dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.train

# train -> export -> predict -> evaluate on the built-in shapes data (generated on first use)
demo: $(VENV)/.train
	@set -e; t0=$$(date +%s); \
	run=$$($(BIN)/toolkit train configs/quickstart.yaml); t1=$$(date +%s); \
	$(BIN)/toolkit export $$run -o exported/quickstart.onnx; t2=$$(date +%s); \
	$(BIN)/toolkit predict exported/quickstart.onnx data/shapes/val -o $$run/predictions.csv --topk 3 \
		--grid $$run/predictions.png; t3=$$(date +%s); \
	$(BIN)/toolkit evaluate exported/quickstart.onnx data/shapes/val; t4=$$(date +%s); \
	echo "run: $$run (report: $$run/report/report.md)  model: exported/quickstart.onnx  predictions: $$run/predictions.csv"; \
	echo "seconds: train (with data generation) $$((t1-t0)), export $$((t2-t1)), predict $$((t3-t2)), evaluate $$((t4-t3))"

# The whole suite on every core (pytest-xdist), a test file per worker at a time: a file's fixtures are made
# once (trained models, reference runs, one local Ray) and its tests run in their order. Files holding slow
# tests are handed out first (tests/conftest.py), in that order (--no-loadscope-reorder). At most 8 workers:
# past that the longest file sets the time. One file or test: `.venv/bin/python -m pytest tests/test_x.py`.
TEST_WORKERS ?= auto
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 8 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs exported/*.onnx
