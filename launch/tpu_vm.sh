#!/usr/bin/env bash
# MERIT branches on a Cloud TPU VM slice (single- or multi-host): every worker of the slice runs the same
# command (`gcloud compute tpus tpu-vm ssh --worker=all`), and jax.distributed joins them (TPU metadata).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR BRANCH [BRANCH ...] [-- --config.KEY=VALUE ...]
#
#   REPO_DIR   where the repository lives on the workers (default: ~/merit_jax); SYNC=1 copies this checkout
#              there first (gcloud ... scp --worker=all), SETUP=1 also pip-installs requirements.txt with
#              jax[tpu] at requirements.txt's jax version (read from this checkout's file)
#   PROJECT    gcloud project (default: gcloud's)
# The listed branches run one after another on the whole slice; for K branches in parallel, create K slices
# and call this once per slice. WORKDIR must be a path every worker shares (an NFS / Filestore or gcsfuse
# mount). A preempted (SIGTERM) run saves and exits with 143; rerun the same command to resume.
set -euo pipefail
TPU=${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR BRANCH [BRANCH ...] [-- flags]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
BRANCHES=()
while (( $# )) && [[ "$1" != "--" ]]; do BRANCHES+=("$1"); shift; done
(( $# )) && shift  # the "--"
EXTRA="$*"
(( ${#BRANCHES[@]} )) || { echo "name at least one branch" >&2; exit 2; }
REPO_DIR=${REPO_DIR:-'~/merit_jax'}
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

if [[ "${SYNC:-0}" == 1 ]]; then
  "${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="mkdir -p $REPO_DIR"
  "${GCLOUD[@]}" scp --recurse --zone="$ZONE" $PROJECT_FLAG --worker=all \
    "$(cd "$(dirname "$0")/.." && pwd)"/{merit_jax,configs,launch,requirements.txt} "$TPU:$REPO_DIR/"
fi
if [[ "${SETUP:-0}" == 1 ]]; then
  REQUIREMENTS="$(cd "$(dirname "$0")/.." && pwd)/requirements.txt"
  # an unpinned jax[tpu] would pull the newest jax, not the one requirements.txt pins
  JAX_VERSION=$(sed -nE 's/^jax(\[[^]]*\])?==([^ ;#]+).*/\2/p' "$REQUIREMENTS" | head -n 1)
  [[ -n "$JAX_VERSION" ]] || { echo "no 'jax==VERSION' line in $REQUIREMENTS" >&2; exit 2; }
  "${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="cd $REPO_DIR && python3 -m pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
fi
for k in "${BRANCHES[@]}"; do
  echo "branch $k on $TPU"
  "${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="cd $REPO_DIR && \
    MERIT_DISTRIBUTED=tpu JAX_COMPILATION_CACHE_DIR=$WORKDIR/jax_cache python3 -m merit_jax.main --config $CONFIG --workdir $WORKDIR $EXTRA --stage train --branch $k"
done
