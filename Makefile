# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-incdet
WORK ?= runs/demo
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test lint benchmark clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision in one pip call, so that the two builds match
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[test,export]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python tools/run_protocol.py --config configs/shapes_demo.yaml --work-dir $(WORK) \
		--methods incdet,finetune,joint

test: setup
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/pip install -q -e ".[lint]"
	$(BIN)/flake8 incdet tools tests
	$(BIN)/isort --check-only --diff incdet tools tests

benchmark: setup
	$(BIN)/python tools/benchmark.py --quick

clean:
	rm -rf $(VENV) runs *.egg-info
