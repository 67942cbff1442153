#!/usr/bin/env bash
# Submit a sisa-ray command as a Ray job to a running cluster.
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh train --store s3://bucket/sisa --shards 64
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh delete --store s3://bucket/sisa --ids 3,17,42
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh compare --dataset fashion-mnist --methods all
# The working directory (this repository) is shipped with the job to every node and put on its
# sys.path, so shard workers import sisa_ray there; the pip list installs the package's pins.
# The store must be shared storage (s3://, gs://, or a mount every node sees).
# The command joins the job's cluster (--address auto) unless it names its own --address.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server of the cluster, e.g. http://head:8265}"
cd "$(dirname "$0")/.."
RUNTIME_ENV='{"pip": ["torch==2.14.1", "torchvision==0.29.1", "mlflow>=3,<4", "optuna>=3.6,<6",
  "scikit-learn>=1.4,<2", "matplotlib>=3.7", "psutil>=5.9", "tqdm>=4.60", "scipy>=1.10", "boto3>=1.36"],
  "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}'
ADDRESS=(--address auto)
for arg in "$@"; do
  case "$arg" in
    --address|--address=*) ADDRESS=() ;;
  esac
done
exec ray job submit --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- python -m sisa_ray "$@" "${ADDRESS[@]}"
