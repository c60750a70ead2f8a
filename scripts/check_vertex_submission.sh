#!/usr/bin/env bash
# Checks a real submission to Vertex AI Pipelines: every check and the request body first
# (--dry-run, nothing sent), then a short tune-large-model run followed to its end (--wait).
# Usage: scripts/check_vertex_submission.sh PROJECT REGION gs://BUCKET/DIR gs://BUCKET/train.jsonl [SERVICE_ACCOUNT]
# Needs: gcloud auth application-default login, and the bucket in PROJECT.
set -euo pipefail
project=${1:?project}; region=${2:?region}; root=${3:?pipeline root gs://...}; data=${4:?dataset gs://...}
account=${5:-}
args=(tune-large-model --vertex --project "$project" --region "$region" --pipeline-root "$root"
      --param "project=$project" --param model_display_name=tunepipe-check
      --param "dataset_uri=$data" --param train_steps=10)
[[ -n "$account" ]] && args+=(--service-account "$account")
tunepipe submit "${args[@]}" --dry-run
tunepipe submit "${args[@]}" --wait
