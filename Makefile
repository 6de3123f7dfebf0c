# The README's two commands: `make demo` (a first run with results on screen) and `make test`.
PORT ?= 8000
SHARED_DIR ?= $(or $(LOOKALIKE_SHARED_DIR),../shared)
# The demo catalogue: LOOKALIKE_DEMO_CATALOG, else the 1,002 photos beside this repository, else none (an empty
# catalogue, whose page says how to load one).
DEMO_CATALOG := $(or $(LOOKALIKE_DEMO_CATALOG),$(wildcard $(SHARED_DIR)/data/demo))

.PHONY: demo test

# Virtual environment, install, a model (exported ResNet50 with ImageNet weights unless LOOKALIKE_MODEL names one),
# then everything up on this machine with the demo catalogue loaded, if there is one.
demo: .venv/bin/lookalike
	@if [ -z "$$LOOKALIKE_MODEL" ] && [ ! -f models/resnet50_max.onnx ]; then .venv/bin/lookalike export; fi
	.venv/bin/lookalike up --port $(PORT)$(if $(DEMO_CATALOG), --catalog "$(DEMO_CATALOG)")

test: .venv/.dev-installed
	.venv/bin/python -m pytest

.venv/.dev-installed: .venv/bin/lookalike
	.venv/bin/pip install --quiet -e ".[cpu,export,up,dev]"
	@touch $@

.venv/bin/lookalike: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install -e ".[cpu,export,up]"
	@touch $@
