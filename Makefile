# The two commands of the README: `make run` and `make test`. Both set everything up first.
INPUT ?= ../shared/data/fruits360-sample
OUTPUT ?= out/fruits360-sample
# Local model files when ../shared is beside the checkout; otherwise fruitpipe downloads and verifies them.
MODELS ?= ../shared/models
ARGS ?=
MODELS_ENV := $(if $(wildcard $(MODELS)/mobilenet_v2_features.onnx),FRUITPIPE_MODELS=$(abspath $(MODELS)),)

.PHONY: setup run test
setup:
	./scripts/setup.sh dev

run: setup
	$(MODELS_ENV) .venv/bin/fruitpipe run "$(INPUT)" "$(OUTPUT)" $(ARGS)

test: setup
	.venv/bin/ruff check src
	.venv/bin/mypy
	.venv/bin/python -m pytest -q

