"""Where a component runs: a task pod of a Kubeflow Pipelines cluster, or a local process.

Kubernetes sets ``KUBERNETES_SERVICE_HOST`` and ``KUBERNETES_SERVICE_PORT`` in every pod, and
Kubeflow Pipelines' backend sets ``KFP_POD_NAME`` in every task's container (its launcher reads
it). Both are needed: a pod alone may be a CI job running the KFP local runner, and the local
runner sets neither. upload_model and deploy_endpoint keep the model and serve it outside the
task's pod only in a cluster; everywhere else they behave as locally.
"""
from __future__ import annotations

import os

CLUSTER_ENV = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
KFP_TASK_ENV = "KFP_POD_NAME"


def in_kfp_cluster() -> bool:
    """True in a task pod of a Kubeflow Pipelines cluster."""
    return all(os.environ.get(name) for name in (*CLUSTER_ENV, KFP_TASK_ENV))
