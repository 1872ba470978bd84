#!/usr/bin/env bash
# Submit any tregjax command to SLURM (sbatch: detached, requeued on preemption): srun runs one JAX process per node
# (all its GPUs) or per GPU; `export` and `assets` run as one task.
#
#   launch/gpu_slurm.sh [--nodes N] [--gpus-per-node G] [--per-gpu] [--partition P] [--account A] [--qos Q]
#                       [--mem M] [--cpus-per-task C] [--time HH:MM:SS] [--job-name NAME] [--logs DIR]
#                       [--venv DIR [--setup] [--jax 'jax[cuda12]']] [--dry-run] COMMAND -- ARGS...
#
# COMMAND: score | train | generate | export | assets (python -m tregjax.COMMAND ARGS; `train` when omitted).
# jax.distributed.initialize() finds the coordinator (the allocation's first node), the process count and this
# process's id from SLURM's variables (SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID), so the same command runs on
# every task. --venv activates DIR on every task; with --setup the job first creates it (on shared storage) with
# Python >= 3.11 (the node's python3 when new enough, else uv's 3.11 from PyPI) and installs requirements.txt and
# jax[cuda12]. Logs: DIR/NAME-JOBID.out (default logs/), each line prefixed with its task id. --dry-run prints the
# batch script instead of submitting it.
set -euo pipefail

nodes=1
gpus=8
per_gpu=0
partition=""
account=""
qos=""
mem=""
cpus=8
time_limit="24:00:00"
venv=""
setup=0
jax_spec="jax[cuda12]"
dry_run=0
job_name="tregjax"
log_dir="logs"
command=""
args=()
commands=" score train generate export assets "
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --qos) qos="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --cpus-per-task) cpus="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --jax) jax_spec="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --logs) log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; args=("$@"); break ;;
    *)
      if [[ -z "$command" && "$commands" == *" $1 "* ]]; then command="$1"; shift
      else echo "unknown option or command $1 (commands:${commands% }; their arguments go after --)" >&2; exit 2; fi ;;
  esac
done
command="${command:-train}"
if [[ ${#args[@]} -eq 0 ]]; then
  echo "missing the arguments of tregjax.$command after -- (e.g. --config configs/my_data.py --workdir DIR)" >&2
  exit 2
fi
if [[ $setup -eq 1 && -z "$venv" ]]; then
  echo "--setup needs --venv DIR (on storage every node sees)" >&2
  exit 2
fi

if [[ "$command" == "export" || "$command" == "assets" ]]; then
  nodes=1; tasks_per_node=1; gpus_per_task=1
elif [[ $per_gpu -eq 1 ]]; then
  tasks_per_node="$gpus"
  gpus_per_task=1
else
  tasks_per_node=1
  gpus_per_task="$gpus"
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "$log_dir" != /* ]]; then
  log_dir="$repo/$log_dir"  # sbatch resolves --output from where it is called; the job runs from the checkout
fi
printf -v cmd_args ' %q' "${args[@]}"
prepare=""
if [[ -n "$venv" ]]; then
  printf -v venv_q '%q' "$venv"
  printf -v jax_q '%q' "$jax_spec"
  if [[ $setup -eq 1 ]]; then
    prepare="# Python >= 3.11 and the CUDA jax, once, on the first node (the venv lives on shared storage).
if [[ ! -x ${venv_q}/bin/python ]]; then
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then python3 -m venv ${venv_q}
  else python3 -m pip install -q --user uv && \"\$HOME/.local/bin/uv\" venv --seed --python 3.11 ${venv_q}; fi
fi
${venv_q}/bin/python -m pip install -q -r requirements.txt ${jax_q}
"
  fi
  prepare+="source ${venv_q}/bin/activate"
fi
sbatch_lines=""
for opt in "partition=$partition" "account=$account" "qos=$qos" "mem=$mem"; do
  if [[ -n "${opt#*=}" ]]; then
    sbatch_lines+="#SBATCH --${opt}
"
  fi
done

script="#!/usr/bin/env bash
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks_per_node}
#SBATCH --gpus-per-task=${gpus_per_task}
#SBATCH --cpus-per-task=${cpus}
#SBATCH --time=${time_limit}
#SBATCH --output=${log_dir}/%x-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
${sbatch_lines}set -euo pipefail
cd $(printf '%q' "$repo")
${prepare}
# SIGTERM (preemption, --signal, scancel) reaches every task; tregjax saves at the next step boundary and exits 0,
# and a requeued job resumes from --workdir (score and generate resume from their work shards).
srun --kill-on-bad-exit=1 --label python -m tregjax.${command}${cmd_args}
"

if [[ $dry_run -eq 1 ]]; then
  printf '%s' "$script"
  exit 0
fi
mkdir -p "$log_dir"
printf '%s' "$script" | sbatch
echo "logs: $log_dir/${job_name}-JOBID.out (squeue -u \$USER; scancel JOBID stops it, train saves first)"
