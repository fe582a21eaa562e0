#!/usr/bin/env bash
# Reproduce the paper's figures: every paper sweep (configs/paper/), then a summary (CSV + Markdown) and
# the figures (PNG + PDF) of each, and a README-ready table of the headline numbers and times.
#
#   scripts/reproduce.sh quick      # CPU-sized sweeps (paper=<name>_quick): about 10 minutes on 2 cores
#   scripts/reproduce.sh full       # the paper's sizes (paper=<name>): hours; GPU advised for patches
#
# Environment:
#   JOBS=N          parallel jobs (hydra/launcher=joblib, default: number of CPU cores); JOBS=1 runs the
#                   basic launcher, one job after another
#   THREADS=N       torch threads per job (default: cores / JOBS, at least 1), set through OMP_NUM_THREADS
#   SWEEPS="a b"    only these sweeps (default: bars_recovery objectives patches_annealing amortized_vs_not)
#   LAUNCHER="..."  extra launcher overrides instead of joblib, e.g. for Slurm:
#                   LAUNCHER="hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1
#                             hydra.launcher.timeout_min=120 hydra.launcher.mem_gb=32"
#   Any further arguments are Hydra overrides applied to every job (e.g. device=cpu).
#
# Output: outputs/paper/<sweep>[_quick]/ with one results.h5 per job, summary.{csv,md}, runs.csv and
# figures/; outputs/paper/reproduce_<mode>.md collects the summaries and the timing table. A sweep
# directory that already exists is moved aside to <dir>.old-<time> (results are never overwritten).
# A sweep with failed jobs does not stop the script: the failures are listed in its summary, and the script
# ends with exit status 1 after every sweep, its summary and figures (0 when everything ran).
set -u
cd "$(dirname "$0")/.."

MODE="${1:-quick}"
shift || true
case "$MODE" in
  quick) SUFFIX="_quick" ;;
  full) SUFFIX="" ;;
  *) echo "usage: scripts/reproduce.sh quick|full [hydra overrides...]" >&2; exit 2 ;;
esac

CORES="$(python -c 'import os; print(len(os.sched_getaffinity(0)))')"
JOBS="${JOBS:-$CORES}"
THREADS="${THREADS:-$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
SWEEPS="${SWEEPS:-bars_recovery objectives patches_annealing amortized_vs_not}"
if [ -n "${LAUNCHER:-}" ]; then
  read -r -a LAUNCH <<< "$LAUNCHER"
elif [ "$JOBS" -gt 1 ]; then
  LAUNCH=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
else
  LAUNCH=()
fi

REPORT="outputs/paper/reproduce_${MODE}.md"
mkdir -p outputs/paper
TIMES=()
FAILED=()
START_ALL=$(date +%s)
echo "reproduce.sh $MODE: sweeps [$SWEEPS], $JOBS parallel jobs x $THREADS torch threads, launcher: ${LAUNCH[*]:-basic}"

for SWEEP in $SWEEPS; do
  NAME="${SWEEP}${SUFFIX}"
  DIR="outputs/paper/$NAME"
  if [ -e "$DIR" ]; then
    OLD="$DIR.old-$(date +%Y%m%d-%H%M%S)"
    echo "moving the existing $DIR aside to $OLD"
    mv "$DIR" "$OLD"
  fi
  echo "=== $NAME: python -m sparse_elbo.train paper=$NAME ${LAUNCH[*]} $*"
  T0=$(date +%s)
  if ! python -m sparse_elbo.train "paper=$NAME" "${LAUNCH[@]}" "$@"; then
    echo "!!! $NAME: some jobs failed (listed in $DIR/summary.md)"
    FAILED+=("$NAME (jobs)")
  fi
  T1=$(date +%s)
  python -m sparse_elbo.report.summarize "$DIR" > /dev/null || { echo "!!! $NAME: summary failed"; FAILED+=("$NAME (summary)"); }
  python -m sparse_elbo.report.figures "$DIR" > /dev/null || { echo "!!! $NAME: figures failed"; FAILED+=("$NAME (figures)"); }
  T2=$(date +%s)
  TIMES+=("$NAME|$((T1 - T0))|$((T2 - T1))")
  echo "=== $NAME: sweep $((T1 - T0)) s, summary and figures $((T2 - T1)) s"
done
END_ALL=$(date +%s)

python -m sparse_elbo.report.reproduce "$MODE" "$REPORT" "$((END_ALL - START_ALL))" "$JOBS" "$THREADS" "${TIMES[@]}"
cat "$REPORT"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "reproduce.sh: failed: ${FAILED[*]}" >&2
  exit 1
fi
