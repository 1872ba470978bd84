#!/usr/bin/env bash
# N JAX processes on this machine, one coordinator: how multi-host runs are tested without a cluster.
#
#   launch/local_multiprocess.sh [-n N] [--port P] [--devices-per-process D] [--dry-run] [-- COMMAND ...]
#
# COMMAND defaults to `python -m tregjax.train`; everything after `--` replaces it, and arguments before `--` that
# this script does not know are passed to it. Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID (read by every command's cli.init_distributed: train, score, generate; CPU collectives over gloo)
# and D fake CPU devices. Logs go to stdout with a [pK] prefix; the script exits non-zero if any process fails.
set -euo pipefail

num=2
port=""
devices=1
dry_run=0
cmd=()
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    --) shift; cmd=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ ${#cmd[@]} -eq 0 ]]; then
  cmd=(python -m tregjax.train)
fi
cmd+=("${extra[@]+"${extra[@]}"}")
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
root="$(cd "$(dirname "$0")/.." && pwd)"

pids=()
for ((i = 0; i < num; i++)); do
  envs=(JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=127.0.0.1:${port}" "JAX_NUM_PROCESSES=${num}"
        "JAX_PROCESS_ID=${i}" "XLA_FLAGS=--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
        "PYTHONPATH=${root}${PYTHONPATH:+:${PYTHONPATH}}")
  if [[ $dry_run -eq 1 ]]; then
    printf 'env'; printf ' %q' "${envs[@]}" "${cmd[@]}"; printf '\n'
    continue
  fi
  env "${envs[@]}" "${cmd[@]}" > >(sed "s/^/[p${i}] /") 2>&1 &
  pids+=($!)
done
[[ $dry_run -eq 1 ]] && exit 0

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
