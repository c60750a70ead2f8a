#!/usr/bin/env bash
# Checks a real submission to Vertex AI Pipelines: every check and the request body first
# (--dry-run, nothing sent), then a short tune-large-model run followed to its end (--wait).
# Needs: gcloud auth application-default login, and the bucket in PROJECT.
set -euo pipefail
usage="usage: $0 PROJECT REGION gs://BUCKET/DIR gs://BUCKET/train.jsonl [SERVICE_ACCOUNT]
  submits a 10-step tune-large-model run of the dataset to Vertex AI Pipelines in PROJECT and
  REGION, its outputs under the pipeline root gs://BUCKET/DIR"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then echo "$usage"; exit 0; fi
if [[ $# -lt 4 || $# -gt 5 ]]; then echo "$usage" >&2; exit 2; fi
project=$1; region=$2; root=$3; data=$4; account=${5:-}
tunepipe=$(dirname "$0")/../.venv/bin/tunepipe
[[ -x $tunepipe ]] || tunepipe=tunepipe  # the checkout's, else the one on PATH
args=(tune-large-model --vertex --project "$project" --region "$region" --pipeline-root "$root"
      --param "project=$project" --param model_display_name=tunepipe-check
      --param "dataset_uri=$data" --param train_steps=10)
[[ -n "$account" ]] && args+=(--service-account "$account")
"$tunepipe" submit "${args[@]}" --dry-run
"$tunepipe" submit "${args[@]}" --wait
