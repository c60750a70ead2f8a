"""The container image every component runs in on Vertex AI Pipelines or Kubeflow Pipelines.

Built from the project's Dockerfile (`make image`). Components are declared with
``BASE_IMAGE``; `tunepipe compile --image REF` (or the ``TUNEPIPE_IMAGE`` environment variable)
writes another image into the templates in its place. The KFP local runner ignores it and runs
the components in the current Python environment.
"""
BASE_IMAGE = "ghcr.io/tunepipe/tunepipe:0.1.0"
