# Two commands for a new machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

# (re)install when pyproject.toml changes; the stamp marks a finished install
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

# train -> export -> predict -> evaluate on the built-in shapes data (generated on first use)
demo: $(STAMP)
	@set -e; \
	run=$$($(BIN)/toolkit train configs/quickstart.yaml); \
	$(BIN)/toolkit export $$run -o exported/quickstart.onnx; \
	$(BIN)/toolkit predict exported/quickstart.onnx data/shapes/val -o $$run/predictions.csv --topk 3; \
	$(BIN)/toolkit evaluate exported/quickstart.onnx data/shapes/val; \
	echo "run: $$run  model: exported/quickstart.onnx  predictions: $$run/predictions.csv"

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs exported/*.onnx
