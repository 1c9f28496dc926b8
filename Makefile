# The two commands of the README.  Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install-export install-demo lint bench-demo bench-policies bench-kv bench-peers demo-int4

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

## policies (greedy and T=0.8) and the LOSSY relaxed mode, side by side
bench-policies:
	$(PYTHON) -m specrt.cli bench .cache/demo/engine --k 1,2,4 --repeats 1 --max-new-tokens 64 --policies --relaxed 0.05,0.2 --prompts benchmarks/demo_prompts_small.json --json-out .cache/demo/bench_policies.json

## the in-graph KV copy at contexts 64 / 512 / 2048
bench-kv:
	$(PYTHON) benchmarks/kv_copy.py .cache/demo/engine --repeats 20

## transformers generate() and assisted generation on the same checkpoints
bench-peers:
	$(PYTHON) benchmarks/peers.py .cache/demo/engine --target-hf .cache/demo/verifier-hf --draft-hf engines/demo/draft --k 4 --repeats 1 --prompts benchmarks/demo_prompts.json --out .cache/demo/peers.md

## int4 verifier + draft engine (ONNX Runtime MatMulNBits), then its bench
demo-int4:
	$(PYTHON) -m specrt.cli export --target .cache/demo/verifier-hf --draft engines/demo/draft --out .cache/demo/engine-int4 --max-context 1024 --quant int4 --force
	$(PYTHON) -m specrt.cli bench .cache/demo/engine-int4 --k 1,2,4 --repeats 2 --max-new-tokens 64 --prompts benchmarks/demo_prompts.json --json-out .cache/demo/bench_int4.json

lint:
	$(PYTHON) -m ruff check .
