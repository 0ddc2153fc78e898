#!/usr/bin/env bash
# The whole MERIT pipeline on one machine, with the K branches as separate processes.
#
#   launch/local.sh [CONFIG] [WORKDIR] [--config.KEY=VALUE ...]
#
#   CONFIG   default configs/default.py;  WORKDIR default workdir/local
#   PARALLEL=N            train up to N branches at once (default 1: one after another)
#   DEVICES_PER_BRANCH=G  with PARALLEL>1 on GPUs: branch slot s sees GPUs [s*G, (s+1)*G) via CUDA_VISIBLE_DEVICES
#
# Every step is resumable: rerun the same command after an interruption and finished work is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-configs/default.py}
WORKDIR=${2:-workdir/local}
shift $(( $# < 2 ? $# : 2 ))
EXTRA=("$@")
PARALLEL=${PARALLEL:-1}
DEVICES_PER_BRANCH=${DEVICES_PER_BRANCH:-0}

stage() {  # stage NAME [more flags]
  python -m merit_jax.main --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}" --stage "$@"
}

stage basin      # a no-op when basin.enabled=False
stage extract
stage split
K=$(python -c "import json, sys; print(len(json.load(open(sys.argv[1]))['groups']))" "$WORKDIR/split/partition.json")
echo "training $K branch(es), $PARALLEL at a time"

mkdir -p "$WORKDIR/logs"
pids=()
for ((k = 0; k < K; k++)); do
  slot=$(( k % PARALLEL ))
  if (( PARALLEL > 1 && ${#pids[@]} >= PARALLEL )); then  # wait for the oldest running branch
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
  if (( PARALLEL > 1 )); then
    env_devices=()
    if (( DEVICES_PER_BRANCH > 0 )); then
      env_devices=(CUDA_VISIBLE_DEVICES=$(seq -s, $(( slot * DEVICES_PER_BRANCH )) $(( (slot + 1) * DEVICES_PER_BRANCH - 1 ))))
    fi
    env "${env_devices[@]}" python -m merit_jax.main --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}" \
      --stage train --branch "$k" > "$WORKDIR/logs/branch-$k.log" 2>&1 &
    pids+=($!)
    echo "branch $k: pid $! (log $WORKDIR/logs/branch-$k.log)"
  else
    stage train --branch "$k"
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

stage merge
stage export
stage evaluate
stage report
echo "done: $WORKDIR/report/report.md"
