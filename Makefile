# The two commands of the README.  Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install-export install-demo lint bench-demo

install-export:
	$(PIP) -e ".[export,test]"

install-demo:
	$(PIP) -e ".[export,demo,test]"

## make demo: convert SmolLM2-135M-Instruct, export it with the committed draft, answer two prompts
demo: install-demo
	$(PYTHON) scripts/demo.py

## make test: the whole test suite (CPU only; GPU/TensorRT tests are skipped with their reason)
test: install-demo
	$(PYTHON) -m pytest -q -ra

## speed of the demo pair, side by side (after `make demo`)
bench-demo:
	$(PYTHON) -m specrt.cli bench .cache/demo/engine --k 2,4,8 --repeats 3 --max-new-tokens 96 --prompts benchmarks/demo_prompts.json --json-out .cache/demo/bench.json

lint:
	$(PYTHON) -m ruff check .
