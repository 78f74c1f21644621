#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command runs on every host; jax.distributed finds the others.
#   TPU=my-v5e-64 ZONE=us-west4-a CONFIG=configs/coco.py WORKDIR=gs://bucket/runs/coco_r50 bash launch/tpu_vm.sh \
#       --config.dataset.train=s3://bucket/coco/train --config.dataset.val=s3://bucket/coco/val
# WORKDIR must be storage that every host sees (a GCS bucket or a shared filesystem) for Orbax checkpoints.
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${CONFIG:=configs/coco.py}" "${WORKDIR:?shared workdir}"
REPO=${REPO:-$(git rev-parse --show-toplevel)}
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU":~/panoptic_jax
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/panoptic_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' &&
  .venv/bin/python -m panoptic_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $*"
