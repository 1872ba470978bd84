#!/usr/bin/env bash
# Run any tregjax command on a Cloud TPU VM (one host or a pod slice), detached: create the VM if missing, copy this
# checkout to every worker, install Python >= 3.11, requirements.txt and requirements-tpu.txt (jax[tpu]) into a
# venv, then start the command under nohup on every worker (export: worker 0 only). A dropped ssh session does not
# stop it; each worker logs to its own file.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator v5p-16] [--version tpu-ubuntu2204-base] [--project P]
#                     [--spot] [--skip-setup] [--dry-run] COMMAND -- ARGS...
#   launch/tpu_pod.sh --name NAME --zone ZONE --status | --tail [N] | --stop
#
# COMMAND: score | train | generate | export | assets (python -m tregjax.COMMAND ARGS on the workers; `train` when
# omitted). --status: each worker's state (running, or its exit status); --tail N: the last N lines of each worker's
# log (default 50), prefixed with the worker's host name; --stop: SIGTERM (train saves a checkpoint and exits 0).
# jax.distributed.initialize() discovers the pod's hosts by itself. Give every host the same storage (a gs://
# --workdir and cache, see docs/storage.md). --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

name=""
zone=""
accelerator="v5p-16"
version="tpu-ubuntu2204-base"  # Python 3.10: the setup installs 3.11 with uv (from PyPI)
project=""
spot=0
dry_run=0
setup=1
action="run"
tail_lines=50
command=""
args=()
commands=" score train generate export assets "
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-setup) setup=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --status) action="status"; shift ;;
    --stop) action="stop"; shift ;;
    --tail)
      action="tail"
      if [[ $# -gt 1 && "$2" =~ ^[0-9]+$ ]]; then tail_lines="$2"; shift; fi
      shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; args=("$@"); break ;;
    *)
      if [[ -z "$command" && "$commands" == *" $1 "* ]]; then command="$1"; shift
      else echo "unknown option or command $1 (commands:${commands% }; their arguments go after --)" >&2; exit 2; fi ;;
  esac
done
command="${command:-train}"
if [[ -z "$name" || -z "$zone" ]]; then
  echo "--name and --zone are required" >&2
  exit 2
fi
if [[ "$action" == "run" && ${#args[@]} -eq 0 ]]; then
  echo "missing the arguments of tregjax.$command after -- (e.g. --config configs/my_data.py --workdir gs://b/run)" >&2
  exit 2
fi

common=(--zone "$zone")
if [[ -n "$project" ]]; then
  common+=(--project "$project")
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
logs="\$HOME/tregjax-logs"  # on each worker (expanded there)

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKERS REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command "$2"
}

case "$action" in
  status)
    on_workers all "for f in $logs/*.pid; do [ -e \"\$f\" ] || continue; c=\$(basename \"\$f\" .pid);
      if [ -s $logs/\$c.rc ]; then echo \"[\$(hostname)] \$c: finished, exit \$(cat $logs/\$c.rc)\";
      elif kill -0 \"\$(cat \"\$f\")\" 2>/dev/null; then echo \"[\$(hostname)] \$c: running\";
      else echo \"[\$(hostname)] \$c: ended without an exit status (killed?)\"; fi; done"
    exit 0 ;;
  tail)
    on_workers all "tail -n $tail_lines $logs/latest.log | sed \"s/^/[\$(hostname)] /\""
    exit 0 ;;
  stop)
    on_workers all "for f in $logs/*.pid; do kill -TERM \"\$(cat \"\$f\")\" 2>/dev/null || true; done"
    exit 0 ;;
esac

if [[ $setup -eq 1 ]]; then
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
  run tar -C "$repo" --exclude=.git --exclude='./workdir*' --exclude='./runs' --exclude='__pycache__' \
      -czf "$archive" .
  run gcloud compute tpus tpu-vm scp "$archive" "${name}:~/tregjax.tar.gz" "${common[@]}" --worker=all

  # 3. A venv with Python >= 3.11 (the image's python3 when new enough, else uv's 3.11), tregjax's requirements and
  #    jax[tpu] at the version requirements-tpu.txt pins (with its libtpu).
  install="set -e; mkdir -p ~/tregjax && tar -xzf ~/tregjax.tar.gz -C ~/tregjax && cd ~/tregjax"
  install+="; if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then python3 -m venv ~/tregjax-venv"
  install+="; else python3 -m pip install -q --user uv && ~/.local/bin/uv venv --seed --python 3.11 ~/tregjax-venv; fi"
  install+="; ~/tregjax-venv/bin/python -m pip install -q -r requirements.txt -r requirements-tpu.txt"
  on_workers all "$install"
fi

# 4. The command, detached (nohup): its log, pid and exit status under ~/tregjax-logs/ on each worker.
workers="all"
if [[ "$command" == "export" || "$command" == "assets" ]]; then
  workers="0"  # one host writes the export
fi
printf -v cmd_args ' %q' "${args[@]}"
inner="\$HOME/tregjax-venv/bin/python -m tregjax.$command$cmd_args; echo \$? > $logs/$command.rc"
printf -v inner_q '%q' "$inner"
start="set -e; mkdir -p $logs && cd ~/tregjax && rm -f $logs/$command.rc"
start+="; nohup bash -c $inner_q > $logs/$command.log 2>&1 < /dev/null & echo \$! > $logs/$command.pid"
start+="; ln -sf $command.log $logs/latest.log; echo \"[\$(hostname)] started tregjax.$command (pid \$(cat $logs/$command.pid))\""
on_workers "$workers" "$start"
if [[ $dry_run -eq 0 ]]; then
  echo "watch it: $0 --name $name --zone $zone --status | --tail [N]"
fi
