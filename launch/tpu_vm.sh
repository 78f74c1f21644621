#!/usr/bin/env bash
# Train kMaX-DeepLab on a Cloud TPU VM slice: create it (queued resources), install, run on every worker, and come
# back from preemption. `bash launch/tpu_vm.sh --help` says everything; docs/launch.md has the background.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] bash launch/tpu_vm.sh COMMAND [MAIN_FLAGS...]

Trains on a Cloud TPU VM slice with gcloud (installed, logged in, a project with TPU quota in ZONE). MAIN_FLAGS go
to `python -m panoptic_jax.main` on every worker, e.g. --config.dataset.train=gs://b/coco/train --mode=train.

Commands
  train, up  create + install + run, and on preemption (the ssh session drops and the queued resource is SUSPENDED
             or FAILED, or the node is PREEMPTED or gone) delete the slice, re-create it, re-install and re-run:
             the run resumes from the newest checkpoint in WORKDIR. Up to MAX_RESTARTS times. Deletes the slice
             when it ends, whether it finished or failed (KEEP_TPU=1 keeps it). A slice that is already ACTIVE is
             reused.
  create     request the slice (gcloud compute tpus queued-resources create; spot unless SPOT=0) and wait until it
             is ACTIVE. Fails with the state when the request goes FAILED or SUSPENDED, or when CREATE_TIMEOUT_S
             runs out.
  install    copy this checkout (the files git tracks or would track) to ~/panoptic_jax on every worker, create
             ~/panoptic_jax/.venv (Python PYTHON_VERSION through uv: TPU images ship an older Python) and install
             requirements.txt and 'jax[tpu]==0.10.2' into it. A few minutes.
  run        run the training command on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all) and
             stream the logs (also to LOG_DIR/run-N.log). One attempt: no restart.
  status     print the queued resource's state and the node's.
  delete     delete the queued resource and its node (billing stops).

Environment
  TPU               name of the TPU node (required)
  ZONE              its zone, e.g. us-west4-a (required)
  PROJECT           gcloud project (default: gcloud's configured project)
  ACCELERATOR       accelerator type (default v5litepod-8); e.g. v4-8, v5litepod-16, v5p-8, v6e-8
  RUNTIME           TPU software version (default from ACCELERATOR: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                    v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  SPOT              1 (default): spot capacity, preemptible at any time; 0: on-demand
  QUEUED_RESOURCE   name of the queued resource (default: $TPU)
  CONFIG            config file, relative to the repository (default configs/coco.py)
  WORKDIR           gs://bucket/prefix or s3://bucket/prefix (required by train and run): checkpoints, config.json,
                    metrics and events. A local path is refused: a worker's disk disappears with a preempted slice,
                    and every worker must see the same checkpoints. SHARED_WORKDIR=1 allows a path that every worker
                    mounts and that outlives them (e.g. a Filestore NFS share).
  FORWARD_ENV       names of local variables to export on the workers, e.g. "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
                    AWS_ENDPOINT_URL" for s3:// data or workdirs (their values travel in the ssh command line)
  MAX_RESTARTS      restarts after preemption before train gives up (default 10)
  POLL_S            seconds between state checks (default 30)
  CREATE_TIMEOUT_S  stop waiting for ACTIVE after this many seconds, and delete the request (default 0: wait as
                    long as it takes; spot capacity can take hours)
  PREEMPT_GRACE_S   after a failed ssh, how long to watch for the state to show a preemption before calling it a
                    failure of the run (default 120)
  PYTHON_VERSION    Python of the workers' venv (default 3.11)
  WORKER_PYTHON     a Python on the workers that already has the requirements (a custom image): install then only
                    copies the code, and run uses this interpreter
  REPO              checkout to copy (default: the one holding this script)
  LOG_DIR           local folder for the streamed logs (default ${TMPDIR:-/tmp}/panoptic_jax_tpu_$TPU)
  KEEP_TPU          1: train leaves the slice up when it ends (it keeps billing)

Processes: every worker runs the same command with --multihost; jax.distributed finds the coordinator, the process
count and each worker's index from the TPU VM's metadata. Where the workers' environment sets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (the tests' fake gcloud does), they are passed as explicit flags instead.

Preemption: a spot slice can be taken back at any time, with about 30 s notice. The workers get SIGTERM, finish the
step and save a checkpoint when there is time (else the newest periodic one, config.train.checkpoint_every, is the
restart point). train then deletes the slice, requests a new one (waiting for capacity again), re-installs and runs
the same command, which resumes exactly where the checkpoint was taken. A run that stopped after SIGTERM on a slice
that is still ACTIVE (a maintenance event) is re-run in place. A run that fails on a healthy slice is not retried:
train exits with its status.

Costs: a slice bills from ACTIVE until it is deleted, training or idle; waiting in the queue is free. train deletes
it at the end (unless KEEP_TPU=1); after create, install or run, delete it yourself. Spot costs a fraction of
on-demand (v5e on demand: about $1.20 per chip-hour, a v5litepod-8 about $10 an hour; see
https://cloud.google.com/tpu/pricing for your region). Storage and egress of the bucket bill separately.

Examples
  TPU=kmax ZONE=us-west4-a WORKDIR=gs://my-bucket/runs/coco_r50 bash launch/tpu_vm.sh train \
      --config.dataset.train=gs://my-bucket/coco/train --config.dataset.val=gs://my-bucket/coco/val
  TPU=kmax ZONE=us-west4-a bash launch/tpu_vm.sh status
  TPU=kmax ZONE=us-west4-a bash launch/tpu_vm.sh delete
EOF
}

log() { printf '[tpu_vm %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "${1:-}" in
  ""|-h|--help|help) usage; exit 0 ;;
esac
COMMAND=$1
shift
MAIN_FLAGS=("$@")

: "${TPU:?TPU (the node name) is required; see --help}" "${ZONE:?ZONE is required; see --help}"
: "${ACCELERATOR:=v5litepod-8}" "${SPOT:=1}" "${QUEUED_RESOURCE:=$TPU}" "${CONFIG:=configs/coco.py}"
: "${MAX_RESTARTS:=10}" "${POLL_S:=30}" "${CREATE_TIMEOUT_S:=0}" "${PREEMPT_GRACE_S:=120}" "${PYTHON_VERSION:=3.11}"
: "${WORKER_PYTHON:=}" "${FORWARD_ENV:=}" "${KEEP_TPU:=0}" "${SHARED_WORKDIR:=0}" "${WORKDIR:=}"
: "${REPO:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}" "${LOG_DIR:=${TMPDIR:-/tmp}/panoptic_jax_tpu_$TPU}"
LOCATION=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
  LOCATION+=(--project="$PROJECT")
fi
REMOTE_DIR=panoptic_jax  # Under each worker's home.

if [[ -z "${RUNTIME:-}" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME= ;;  # create asks for it.
  esac
fi

# The queued resource's state (ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDING, SUSPENDED, FAILED,
# ...), or MISSING when there is none.
queued_state() {
  gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}" --format='value(state.state)' \
    2>/dev/null || echo MISSING
}

# The node's state (CREATING, READY, PREEMPTED, TERMINATED, ...), or MISSING.
node_state() {
  gcloud compute tpus tpu-vm describe "$TPU" "${LOCATION[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

wait_active() {
  local start=$SECONDS state
  while true; do
    state=$(queued_state)
    case "$state" in
      ACTIVE) log "queued resource $QUEUED_RESOURCE is ACTIVE"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING|MISSING)
        die "queued resource $QUEUED_RESOURCE is $state instead of ACTIVE (quota, capacity or a bad ACCELERATOR /" \
            "RUNTIME: 'gcloud compute tpus queued-resources describe $QUEUED_RESOURCE ${LOCATION[*]}' says why)." \
            "It still exists unless MISSING: 'bash launch/tpu_vm.sh delete' removes it" ;;
    esac
    if (( CREATE_TIMEOUT_S > 0 && SECONDS - start >= CREATE_TIMEOUT_S )); then
      log "still $state after ${CREATE_TIMEOUT_S}s; deleting the request"
      delete_slice
      die "no slice within CREATE_TIMEOUT_S=${CREATE_TIMEOUT_S}s (last state $state)"
    fi
    log "queued resource $QUEUED_RESOURCE is $state; waiting"
    sleep "$POLL_S"
  done
}

create_slice() {
  [[ -n "$RUNTIME" ]] ||
    die "no default RUNTIME for ACCELERATOR=$ACCELERATOR: set RUNTIME (gcloud compute tpus versions list)"
  local flags=(--node-id="$TPU" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then
    flags+=(--spot)
  fi
  log "requesting $ACCELERATOR ($([[ "$SPOT" == 1 ]] && echo spot || echo on-demand)) as $QUEUED_RESOURCE in $ZONE"
  gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${LOCATION[@]}" "${flags[@]}"
  wait_active
}

delete_slice() {
  if [[ "$(queued_state)" == MISSING ]]; then
    log "no queued resource $QUEUED_RESOURCE to delete"
    return 0
  fi
  log "deleting queued resource $QUEUED_RESOURCE and its node $TPU"
  # --force deletes the node with the request.
  gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${LOCATION[@]}" --force --quiet
}

install() {
  local tmp archive
  tmp=$(mktemp -d)
  archive="$tmp/$REMOTE_DIR.tgz"
  # What git tracks or would track: no .venv, caches or run outputs. Files deleted from the working tree are skipped.
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
     while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
     tar --null -T - -czf "$archive")
  log "copying $REPO ($(du -h "$archive" | cut -f1)) to every worker"
  gcloud compute tpus tpu-vm scp "$archive" "$TPU:$REMOTE_DIR.tgz" "${LOCATION[@]}" --worker=all
  rm -rf "$tmp"
  local setup="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$REMOTE_DIR.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
  if [[ -n "$WORKER_PYTHON" ]]; then
    log "WORKER_PYTHON=$WORKER_PYTHON: no venv created"
  else
    log "creating the venv and installing the requirements on every worker"
    setup+=" && (python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh)"
    setup+=" && ~/.local/bin/uv venv -q --python $PYTHON_VERSION .venv"
    setup+=" && ~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==0.10.2'"
  fi
  gcloud compute tpus tpu-vm ssh "$TPU" "${LOCATION[@]}" --worker=all --command="$setup"
}

check_workdir() {
  [[ -n "$WORKDIR" ]] || die "WORKDIR is required: gs://bucket/prefix or s3://bucket/prefix"
  case "$WORKDIR" in
    gs://*|s3://*) ;;
    *) [[ "$SHARED_WORKDIR" == 1 ]] ||
         die "WORKDIR=$WORKDIR is a local path: each worker would write to its own disk, which a preempted slice" \
             "loses. Use gs://bucket/prefix or s3://bucket/prefix (or SHARED_WORKDIR=1 for a filesystem that every" \
             "worker mounts and that outlives them)" ;;
  esac
}

# The command every worker runs, as one string for the remote shell.
worker_command() {
  local command="cd ~/$REMOTE_DIR &&" name flag
  for name in $FORWARD_ENV; do
    command+=" export $name=$(printf '%q' "${!name:-}") &&"
  done
  command+=' dist=--multihost; if [ -n "${JAX_NUM_PROCESSES:-}" ]; then'
  command+=' dist="--coordinator_address=$JAX_COORDINATOR_ADDRESS --num_processes=$JAX_NUM_PROCESSES'
  command+=' --process_id=$JAX_PROCESS_ID"; fi;'
  command+=" exec $(printf '%q' "${WORKER_PYTHON:-.venv/bin/python}") -m panoptic_jax.main \$dist"
  command+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  for flag in ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
    command+=" $(printf '%q' "$flag")"
  done
  printf '%s' "$command"
}

ATTEMPT=0
# One run on every worker; sets OUTCOME to done, preempted (the slice is gone or going), stopped (the workers were
# stopped by SIGTERM on a healthy slice) or failed, and STATUS to the ssh status.
run_once() {
  mkdir -p "$LOG_DIR"
  local log_file="$LOG_DIR/run-$ATTEMPT.log" start=$SECONDS state
  ATTEMPT=$((ATTEMPT + 1))
  log "running on every worker of $TPU (log: $log_file)"
  set +e
  gcloud compute tpus tpu-vm ssh "$TPU" "${LOCATION[@]}" --worker=all --ssh-flag=-oServerAliveInterval=30 \
    --ssh-flag=-oServerAliveCountMax=6 --command="$(worker_command)" 2>&1 | tee "$log_file"
  STATUS=${PIPESTATUS[0]}
  set -e
  while true; do
    state="$(queued_state)/$(node_state)"
    case "$state" in
      ACTIVE/READY) ;;
      *) log "slice state (queued resource/node): $state"; OUTCOME=preempted; return 0 ;;
    esac
    # A preemption can show in the state a little after the connection drops.
    if (( STATUS == 0 || SECONDS - start >= PREEMPT_GRACE_S )); then
      break
    fi
    sleep "$POLL_S"
  done
  # A run stopped by SIGTERM saves, logs "Stopped at step N after a stop signal" and exits 0 like a finished one.
  if grep -q "after a stop signal" "$log_file"; then
    OUTCOME=stopped
  elif (( STATUS == 0 )); then
    OUTCOME=done
  else
    OUTCOME=failed
  fi
}

train() {
  check_workdir
  if [[ "$KEEP_TPU" != 1 ]]; then
    trap 'status=$?; delete_slice || log "delete failed: run bash launch/tpu_vm.sh delete"; exit $status' EXIT
  fi
  local restarts=0 state fresh=1
  while true; do
    state=$(queued_state)
    if [[ "$state" == ACTIVE ]]; then
      log "queued resource $QUEUED_RESOURCE is already ACTIVE: using it"
    else
      if [[ "$state" != MISSING ]]; then
        log "queued resource $QUEUED_RESOURCE is $state: deleting it first"
        delete_slice
      fi
      create_slice
      fresh=1
    fi
    if (( fresh )); then
      install
      fresh=0
    fi
    run_once
    case "$OUTCOME" in
      done) log "training finished; WORKDIR=$WORKDIR"; return 0 ;;
      failed) die "the run failed on a healthy slice (ssh status $STATUS); not retrying: see the log above" ;;
    esac
    restarts=$((restarts + 1))
    if (( restarts > MAX_RESTARTS )); then
      die "$OUTCOME $restarts times: MAX_RESTARTS=$MAX_RESTARTS reached; rerun train to go on from WORKDIR"
    fi
    if [[ "$OUTCOME" == preempted ]]; then
      log "preempted: re-creating the slice (restart $restarts of $MAX_RESTARTS); the run resumes from WORKDIR"
      delete_slice
    else
      log "the workers were stopped by a signal on a healthy slice: re-running (restart $restarts of $MAX_RESTARTS)"
    fi
  done
}

case "$COMMAND" in
  train|up) train ;;
  create) create_slice ;;
  install) install ;;
  run) check_workdir; run_once; log "run: $OUTCOME"; exit "$STATUS" ;;
  status) echo "queued resource $QUEUED_RESOURCE: $(queued_state); node $TPU: $(node_state)" ;;
  delete) delete_slice ;;
  *) usage >&2; die "unknown command $COMMAND (train, up, create, install, run, status, delete)" ;;
esac
