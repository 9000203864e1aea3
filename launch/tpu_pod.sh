#!/usr/bin/env bash
# Runs one stage on every host of a Cloud TPU VM pod slice (JAX multi-process SPMD).
# jax.distributed.initialize() finds the other hosts by itself on TPU VMs (--multihost).
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [extra --config.KEY=VALUE ...]
#
# WORKDIR must be a folder shared by all hosts: a gs://BUCKET/RUN URL (works when the
# VMs have access: gcsfs installed (pip install gcsfs) and the VMs' service account may
# write the bucket; without access the run stops at once with one line saying why), or an
# NFS / Filestore / gcsfuse mount. config.data.root is a local dataset folder every host
# can read (datasets and their ArrayRecord cache are never URLs).
set -euo pipefail
tpu=$1 zone=$2 workdir=$3 config=${4:-configs/distill.py:b16}
shift $(( $# < 4 ? $# : 4 ))
repo=${REPO_DIR:-~/tigerfg_jax}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  cd $repo
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  case $workdir in gs://*) pip install -q gcsfs ;; esac
  python -m tigerfg_jax.main --multihost --config=$config --workdir=$workdir $*
"
