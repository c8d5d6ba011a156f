#!/usr/bin/env bash
# ProRL on a Slurm cluster: one task per GPU, torch.distributed over NCCL, resumable for weeks.
#
#   sbatch slurm/prorl_1p5b.sh [key.sub=value ...]                 # the paper's run, 4 x 8 GPUs
#   PRORL_RECIPE=recipes/my.yaml sbatch --nodes=1 slurm/prorl_1p5b.sh train.steps=100
#
# Submit from the project directory: Slurm runs a copy of this script from its spool
# directory, so the project is found through $SLURM_SUBMIT_DIR (or PRORL_PROJECT_DIR).
#
# Variables (all optional):
#   PRORL_RECIPE      recipe file, relative to the project            (recipes/prorl_1p5b.yaml)
#   PRORL_RUN_DIR     where checkpoints, metrics and job logs go      (runs/<recipe name>)
#   PRORL_CONTAINER   an image (enroot .sqsh or registry URI): run inside it with pyxis;
#                     empty: run in the virtual environment PRORL_VENV   (empty)
#   PRORL_MOUNTS      extra --container-mounts, comma-separated        (empty)
#   PRORL_VENV        virtual environment to activate without a container  ($PROJECT/.venv)
#   PRORL_NO_REQUEUE  1: do not requeue after the checkpoint signal   (empty)
# Arguments after the script are recipe overrides (key.sub=value), passed to the trainer.
#
# Week-long runs: 20 minutes before the time limit Slurm sends SIGUSR1 to every task; the
# trainer abandons the step if it is still in its rollout (checkpointing the previous step)
# or finishes it, writes a checkpoint and exits with status 3; this script then requeues the
# job, which resumes from the latest checkpoint (checkpoint.resume=auto). Set the lead from
# measured step times: `python tools/plot.py runs/<name>/logs` prints the --signal to use. A
# stage change is in the recipe (stages:) or an override on the next submission.
# Alternative to requeueing: chain jobs with `sbatch --dependency=singleton --job-name=prorl ...`
# submitted several times; each starts when the previous one ends and resumes the same run.
#
#SBATCH --job-name=prorl-1p5b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@1200
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

PROJECT="${PRORL_PROJECT_DIR:-${SLURM_SUBMIT_DIR:?submit with sbatch from the project directory}}"
cd "$PROJECT"
RECIPE="${PRORL_RECIPE:-recipes/prorl_1p5b.yaml}"
[ -f "$RECIPE" ] || { echo "error: recipe $RECIPE not found under $PROJECT" >&2; exit 2; }
NAME="$(basename "$RECIPE" .yaml)"
RUN_DIR="${PRORL_RUN_DIR:-runs/$NAME}"
RESTART="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$RUN_DIR/jobs"
# one log per job and per requeue: an earlier job's log is never written over
LOG="$RUN_DIR/jobs/${SLURM_JOB_ID}-restart${RESTART}.log"

# rendezvous: the first node of the allocation; a port derived from the job id
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# prorl_megatron.parallel reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID itself

TRAIN=(python -m prorl_megatron.train --recipe "$RECIPE"
       "checkpoint.dir=$RUN_DIR/checkpoints" "logging.dir=$RUN_DIR/logs" "checkpoint.resume=auto" "$@")

{
  echo "[prorl] job $SLURM_JOB_ID (restart $RESTART) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS tasks;" \
       "master $MASTER_ADDR:$MASTER_PORT; recipe $RECIPE; run dir $RUN_DIR; $(date -u +%FT%TZ)"
} | tee -a "$LOG"

STOPPED="$RUN_DIR/checkpoints/stopped"  # the trainer writes it after a signal-triggered checkpoint
rm -f "$STOPPED"
set +e
if [ -n "${PRORL_CONTAINER:-}" ]; then
  MOUNTS="$PROJECT:$PROJECT${PRORL_MOUNTS:+,$PRORL_MOUNTS}"
  srun --kill-on-bad-exit=1 --container-image="$PRORL_CONTAINER" --container-mounts="$MOUNTS" \
       --container-workdir="$PROJECT" "${TRAIN[@]}" 2>&1 | tee -a "$LOG"
else
  VENV="${PRORL_VENV:-$PROJECT/.venv}"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  srun --kill-on-bad-exit=1 "${TRAIN[@]}" 2>&1 | tee -a "$LOG"
fi
STATUS=${PIPESTATUS[0]}
set -e

# status 3, or (srun ends the other tasks once one has exited) the trainer's marker
if { [ "$STATUS" -eq 3 ] || [ -f "$STOPPED" ]; } && [ -z "${PRORL_NO_REQUEUE:-}" ]; then
  echo "[prorl] checkpointed step $(cat "$STOPPED" 2>/dev/null) on the stop signal: requeueing job $SLURM_JOB_ID" \
    | tee -a "$LOG"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[prorl] trainer exited with status $STATUS" | tee -a "$LOG"
exit "$STATUS"
