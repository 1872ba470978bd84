#!/usr/bin/env bash
# Run tregjax training on a Cloud TPU VM (single host or pod slice): create it if missing, copy this checkout to every
# worker, install, and start the same command on all hosts with `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator v5p-16] [--version tpu-ubuntu2204-base] [--project P]
#                     [--spot] [--dry-run] -- --config configs/x.py --workdir gs://bucket/run [--config.key=value ...]
#
# jax.distributed.initialize() discovers the pod's hosts by itself. Use a gs:// --workdir so every host sees the same
# checkpoints. --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

name=""
zone=""
accelerator="v5p-16"
version="tpu-ubuntu2204-base"
project=""
spot=0
dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "--name and --zone are required" >&2
  exit 2
fi
if [[ ${#train_args[@]} -eq 0 ]]; then
  echo "missing training arguments after -- (at least --config and --workdir)" >&2
  exit 2
fi

common=(--zone "$zone")
if [[ -n "$project" ]]; then
  common+=(--project "$project")
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# 1. Create the TPU VM unless it exists.
if [[ $dry_run -eq 1 ]] || ! gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
  create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator"
          --version "$version")
  if [[ $spot -eq 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
fi

# 2. Copy this checkout (without local runs and caches) to every worker.
archive="/tmp/tregjax-$$.tar.gz"
run tar -C "$repo" --exclude=.git --exclude='./workdir*' --exclude='./runs' --exclude='__pycache__' -czf "$archive" .
run gcloud compute tpus tpu-vm scp "$archive" "${name}:~/tregjax.tar.gz" "${common[@]}" --worker=all

# 3. Install and train: the same command on all hosts.
printf -v train_cmd ' %q' "${train_args[@]}"
remote="set -e; mkdir -p ~/tregjax && tar -xzf ~/tregjax.tar.gz -C ~/tregjax && cd ~/tregjax"
remote+=" && python3 -m pip install -q -r requirements.txt 'jax[tpu]'"
remote+=" && python3 -m tregjax.train${train_cmd}"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$remote"
