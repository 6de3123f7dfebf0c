# The README's two commands: `make demo` (a first run with results on screen) and `make test`.
PORT ?= 8000
DEMO_CATALOG := $(or $(LOOKALIKE_DEMO_CATALOG),../shared/data/fashion)

.PHONY: demo test

# Virtual environment, install, a model (exported ResNet50 with ImageNet weights unless LOOKALIKE_MODEL names one),
# then everything up on this machine with the demo catalogue loaded.
demo: .venv/bin/lookalike
	@if [ -z "$$LOOKALIKE_MODEL" ] && [ ! -f models/resnet50_max.onnx ]; then .venv/bin/lookalike export; fi
	@test -e "$(DEMO_CATALOG)" || { echo "no demo catalogue at $(DEMO_CATALOG): set LOOKALIKE_DEMO_CATALOG to a \
	folder of product photos, a CSV, a tar archive or a styles.csv + images/ folder"; exit 1; }
	.venv/bin/lookalike up --port $(PORT) --catalog "$(DEMO_CATALOG)"

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
