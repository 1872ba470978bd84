#!/usr/bin/env bash
# Submit a tregjax training run to SLURM: sbatch + srun, one JAX process per node (all its GPUs) or per GPU.
#
#   launch/gpu_slurm.sh --nodes N [--gpus-per-node G] [--per-gpu] [--partition P] [--time HH:MM:SS]
#                       [--venv DIR] [--dry-run] -- --config configs/x.py --workdir DIR [--config.key=value ...]
#
# Arguments after `--` go to `python -m tregjax.train`. jax.distributed.initialize() finds the coordinator (the first
# node of the allocation), the process count and this process's id from SLURM's variables (SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID), so the same command runs on every task. --dry-run prints the batch script instead of
# submitting it.
set -euo pipefail

nodes=1
gpus=8
per_gpu=0
partition=""
time_limit="24:00:00"
venv=""
dry_run=0
job_name="tregjax"
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ ${#train_args[@]} -eq 0 ]]; then
  echo "missing training arguments after -- (at least --config and --workdir)" >&2
  exit 2
fi

if [[ $per_gpu -eq 1 ]]; then
  tasks_per_node="$gpus"
  gpus_per_task=1
else
  tasks_per_node=1
  gpus_per_task="$gpus"
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
printf -v train_cmd ' %q' "${train_args[@]}"
activate=""
if [[ -n "$venv" ]]; then
  printf -v activate 'source %q/bin/activate' "$venv"
fi

script="#!/usr/bin/env bash
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks_per_node}
#SBATCH --gpus-per-task=${gpus_per_task}
#SBATCH --cpus-per-task=8
#SBATCH --time=${time_limit}
#SBATCH --signal=TERM@120
#SBATCH --requeue
${partition:+#SBATCH --partition=${partition}}
set -euo pipefail
${activate}
cd $(printf '%q' "$repo")
# SIGTERM (preemption, --signal, scancel) reaches every task; tregjax saves at the next step boundary and exits 0,
# and a requeued job resumes from --workdir.
srun --kill-on-bad-exit=1 python -m tregjax.train${train_cmd}
"

if [[ $dry_run -eq 1 ]]; then
  printf '%s' "$script"
  exit 0
fi
printf '%s' "$script" | sbatch
