"""The container image every component runs in on Vertex AI Pipelines or Kubeflow Pipelines.

Built from the project's Dockerfile; the KFP local runner ignores it and runs the components in
the current Python environment.
"""
BASE_IMAGE = "tunepipe:latest"
