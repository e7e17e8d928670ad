# The two commands of the README: `make run` and `make test`. Both set everything up first.
# The 5,280-photo sample of ../shared when it is beside the checkout, else the 150 photos shipped in the package.
SHARED_SAMPLE := ../shared/data/fruits360-sample
INPUT ?= $(if $(wildcard $(SHARED_SAMPLE)/Training),$(SHARED_SAMPLE),src/fruitpipe/data/fruits360-mini)
OUTPUT ?= out/$(notdir $(INPUT))
# Local model files when ../shared is beside the checkout; otherwise fruitpipe builds the model from its published
# weights on first use (9.1 MB from raw.githubusercontent.com, sha256-checked, cached in ~/.cache/fruitpipe).
MODELS ?= ../shared/models
ARGS ?=
# The real shop photos the app also learns from (`fruitpipe sample DIR --real`: the Grocery Store Dataset's train and
# val splits, 28 MB, pinned and sha256-checked); REAL_PHOTOS= (empty) runs the pipeline alone, without the classifier.
REAL_PHOTOS ?= out/real-photos
MODELS_ENV := $(if $(wildcard $(MODELS)/mobilenet_v2_features.onnx),FRUITPIPE_MODELS=$(abspath $(MODELS)),)

.PHONY: setup run test test-nodes docs
# `make run` installs what the commands need (the package and its [serve] extra); `make test` adds the test tools.
setup:
	./scripts/setup.sh dev

# `make run`: the pipeline on INPUT, then the app: the real photos fetched and embedded, and the classifier trained
# on both, measured on the val photos it never saw (taken apart from the train photos).
run:
	./scripts/setup.sh serve
	$(MODELS_ENV) .venv/bin/fruitpipe run "$(INPUT)" "$(OUTPUT)" $(ARGS)
ifneq ($(REAL_PHOTOS),)
	.venv/bin/fruitpipe sample "$(REAL_PHOTOS)" --real
	$(MODELS_ENV) .venv/bin/fruitpipe run "$(REAL_PHOTOS)/train" "$(REAL_PHOTOS)-train" -q
	$(MODELS_ENV) .venv/bin/fruitpipe run "$(REAL_PHOTOS)/val" "$(REAL_PHOTOS)-val" -q
	$(MODELS_ENV) .venv/bin/fruitpipe train "$(OUTPUT)" --also "$(REAL_PHOTOS)-train" \
	  --also-families "$(REAL_PHOTOS)/families.json" --also-val "$(REAL_PHOTOS)-val"
endif

test: setup
	.venv/bin/ruff check src
	.venv/bin/mypy
	.venv/bin/python -m pytest -q


# The core pipeline tests again on the EMR nodes' exact packages (src/fruitpipe/cloud/nodes.txt) with PySpark 3.5.6,
# in .venv-nodes; CI runs it after `make test`.
test-nodes: setup
	./scripts/nodes-env.sh
	.venv-nodes/bin/python -m pytest -q -m nodes $$(grep -l 'pytest.mark.nodes' tests/test_*.py)

# docs/cli.md from the parser itself (tests/test_cli.py fails when it is stale).
docs: setup
	.venv/bin/python -m fruitpipe.cli_reference > docs/cli.md
