# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-incdet
WORK ?= runs/demo
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup weights demo test lint benchmark clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision in one pip call, so that the two builds match
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[test,export]"
	touch $(STAMP)

setup: $(STAMP)

# the ImageNet MobileNetV2 file into the torch hub cache, verified (model.weights of the
# pretrained presets); a second call does nothing
weights: setup
	$(BIN)/python tools/fetch_weights.py

demo: setup
	# step 0: a trained 5-class detector, shipped as a torchvision state dict (demo/README.md)
	$(BIN)/python tools/import_detector.py --state-dict demo/shapes_5classes.pt --arch incdet \
		--classes demo/shapes_5classes.pt.json --config configs/shapes_demo.yaml \
		--work-dir $(WORK)/imported --force --no-progress
	# step 1: the other 5 classes, with only their images, by incdet and by finetune
	$(BIN)/python tools/run_protocol.py --config configs/shapes_demo.yaml --work-dir $(WORK) \
		--step0 $(WORK)/imported/step_0 --methods incdet,finetune
	@echo "joint at equal compute needs more time than the demo has: its figures are in docs/benchmarks.md"

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
