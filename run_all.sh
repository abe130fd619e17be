#!/usr/bin/env bash
# Reproduce the paper on one GPU: every cell of Tables 1-3 and Figure 1, then results/RESULTS.md.
#
#   ./run_all.sh                 everything (Table 1: 48 cells and 12 of CE beyond the paper, listed last; Table 2:
#                                14, Table 3: 10, Figure 1; and beyond the paper: infonce, caser-none, negatives,
#                                readme, regime, block), one seed
#   ./run_all.sh WHAT            one part: table1, table2, table3, figure1, infonce, caser-none, negatives, readme (the
#                                README's own command), regime (Beauty SASRec trained per user, packed), block (Beauty
#                                SASRec with the original's block), all (the default), or `tune` for the
#                                hyperparameter search
#   ./run_all.sh halving         the tuning grid by successive halving (`python experiments.py halving`; schedule in
#                                docs/running.md), one run at a time, for DATASETS x MODELS (here beauty and sasrec by
#                                default) and LOSSES=bce,bpr,uniform,ce (the default); log in
#                                runs/logs/halving-<dataset>-<model>.log, then each loss's table
#   ./run_all.sh -h | --help     this help
#   JOBS=6 ./run_all.sh          cells run at once on the one GPU (default 4; more than there are cells is capped)
#   SEEDS=3 ./run_all.sh         seeds 1..3 of every cell (1 to 20: the report reads those); RESULTS.md then shows
#                                mean ± sd
#   DATASETS=beauty MODELS=sasrec ./run_all.sh table1      narrowed: comma-separated, of beauty,toys,sports,yelp
#                                                           and gru4rec,caser,sasrec
#   DEVICE=cuda:1 ./run_all.sh   the device every cell trains on (default: uniform_seqrec.py's choice)
#   OMP_NUM_THREADS=N            CPU threads per cell (default: the CPUs shared among the JOBS)
#   SLURM_ARRAY_TASK_ID=N ./run_all.sh table1                only the N-th cell of that list (a Slurm array task;
#                                                            see the README), no report
#
# Resumable: a finished cell is skipped, an interrupted one resumes from its last epoch; just run it again.
# Logs: runs/logs/<cell>-seed<seed>.log. `tune` ends with `python experiments.py choose`, which puts each cell's
# best finished tuning point into results/hyperparameters.tsv (the per-cell settings every table reads) in place of
# that cell's row, keeping the rows of cells with no finished tuning run.
# Exit status: 0 when every cell succeeded, 1 when some failed (the report still records the others), 2 for bad
# input (one line on stderr, nothing run).
set -euo pipefail
# Into the folder of the script itself, not of a symlink to it (~/bin/reproduce -> .../run_all.sh): experiments.py,
# results/ and runs/ are beside the script. Each link is followed in turn (readlink -f is not on every system).
script=$0
while [ -L "$script" ]; do
  target=$(readlink "$script")
  case $target in /*) script=$target ;; *) script=$(dirname "$script")/$target ;; esac
done
cd "$(dirname "$script")"
script=${script##*/}

die() { echo "run_all.sh: error: $*" >&2; exit 2; }
positive() {  # NAME VALUE: VALUE is a whole number >= 1, written plainly (bash reads 08 as a bad octal number)
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, not ${2@Q}"
}
names() {  # NAME VALUE KNOWN: VALUE is a comma-separated, non-empty list of names from KNOWN, each named once
  local rest=$2, item seen=,
  [ -n "$2" ] || die "$1 is empty (a comma-separated list of $3)"
  while [ -n "$rest" ]; do
    item=${rest%%,*}; rest=${rest#*,}
    [[ ,$3, == *,"$item",* ]] || die "$1: unknown name ${item@Q} in ${2@Q} (known: $3)"
    [[ $seen != *,"$item",* ]] || die "$1 names ${item@Q} twice (${2@Q})"
    seen=$seen$item,
  done
}

# Bad input stops here, before anything runs or is written. JOBS, SEEDS, DATASETS or MODELS set but empty is bad
# input, not the default: `DATASETS=$X` with an empty X must not run every dataset. DEVICE, OMP_NUM_THREADS and
# SLURM_ARRAY_TASK_ID empty mean unset, as for their other readers.
case ${1-all} in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$script"; exit 0 ;;  # the header
  table1|table2|table3|figure1|infonce|caser-none|negatives|readme|regime|block|tune|halving|all) what=${1-all} ;;
  *) die "unknown argument ${1@Q} (one of table1 table2 table3 figure1 infonce caser-none negatives readme regime" \
         "block tune halving all; see --help)" ;;
esac
[ $# -le 1 ] || die "one argument at most, got $# ($*)"
if [ "$what" = halving ]; then DATASETS=${DATASETS-beauty} MODELS=${MODELS-sasrec}; fi   # its own defaults
JOBS=${JOBS-4} SEEDS=${SEEDS-1} DEVICE=${DEVICE-}
DATASETS=${DATASETS-beauty,toys,sports,yelp} MODELS=${MODELS-gru4rec,caser,sasrec}
positive JOBS "$JOBS"
positive SEEDS "$SEEDS"
[ "${#SEEDS}" -le 2 ] && [ "$SEEDS" -le 20 ] || die "SEEDS must be at most 20 (the report reads seeds 1-20), not $SEEDS"
names DATASETS "$DATASETS" beauty,toys,sports,yelp
names MODELS "$MODELS" gru4rec,caser,sasrec
[ -z "${SLURM_ARRAY_TASK_ID:-}" ] || positive SLURM_ARRAY_TASK_ID "$SLURM_ARRAY_TASK_ID"
# OpenMP would ignore garbage with a warning per process; its rarely used lists ("4,2") are refused too.
if [ -n "${OMP_NUM_THREADS:-}" ]; then positive OMP_NUM_THREADS "$OMP_NUM_THREADS"; else unset OMP_NUM_THREADS; fi

if [ "$what" = halving ]; then  # one process per dataset x model trains its rungs in turn: no list, no JOBS
  LOSSES=${LOSSES-bce,bpr,uniform,ce}
  names LOSSES "$LOSSES" bce,bpr,infonce,uniform,ce
  [ "$SEEDS" = 1 ] || die "SEEDS=$SEEDS: halving trains seed 1 only"
  [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || die "SLURM_ARRAY_TASK_ID: halving is one process, not an array of cells"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}  # one run at a time: every CPU
  mkdir -p runs/logs
  failed=0
  for dataset in ${DATASETS//,/ }; do
    for model in ${MODELS//,/ }; do
      log=runs/logs/halving-$dataset-$model.log status=0
      python experiments.py halving --dataset "$dataset" --model "$model" --losses "$LOSSES" \
        ${DEVICE:+--device "$DEVICE"} >> "$log" 2>&1 || status=$?
      if [ "$status" = 0 ]; then
        echo "done    halving $dataset $model ($LOSSES)"
      else
        echo "FAILED  halving $dataset $model (exit $status, see $log; the same command continues)"
        failed=$((failed + 1))
      fi
      python experiments.py halving --dataset "$dataset" --model "$model" --losses "$LOSSES" --report || true
    done
  done
  [ "$failed" = 0 ] || { echo "run_all.sh: $failed halvings FAILED (their FAILED lines above name their logs)" >&2
                         exit 1; }
  exit 0
fi

# The list (one "cell seed" a line); experiments.py's own one-line error stops the script here (set -e).
list=$(python experiments.py list "$what" --datasets "$DATASETS" --models "$MODELS" --seeds "$SEEDS")
[ -n "$list" ] || die "nothing to run: the list of '$what' is empty with DATASETS=$DATASETS MODELS=$MODELS" \
                      "(\`python experiments.py list all\` prints every cell)"
count=$(wc -l <<< "$list")
if [ "${#JOBS}" -gt 9 ] || [ "$JOBS" -gt "$count" ]; then JOBS=$count; fi  # xargs refuses a -P over 2^31
# Each job gets its share of the CPU threads (data stays on the GPU; the CPU only launches kernels).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
mkdir -p runs/logs

run_cell() {  # cell seed; returns the cell's exit status (experiments.py: 0 also when another process has it)
  local log status=0
  log="runs/logs/$(echo "$1" | tr '/,=' '_.-')-seed$2.log"
  python experiments.py run "$1" --seed "$2" ${DEVICE:+--device "$DEVICE"} >> "$log" 2>&1 || status=$?
  if [ "$status" = 0 ]; then
    echo "done    $1 seed $2"
  else
    echo "FAILED  $1 seed $2 (exit $status, see $log)"
    echo "$1 seed $2" >> "${FAILURES:-/dev/null}"
  fi
  return "$status"
}
export -f run_cell
export DEVICE

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # one array task: the cell on line SLURM_ARRAY_TASK_ID of the list
  cell=$(sed -n "${SLURM_ARRAY_TASK_ID}p" <<< "$list")
  if [ -z "$cell" ]; then
    echo "task $SLURM_ARRAY_TASK_ID: the list of '$what' is shorter; nothing to do (it has $count cells)"
    exit 0
  fi
  run_cell $cell || exit  # ($cell is "cell seed": two arguments) the task's exit status is the cell's
  exit 0
fi

# Every cell is tried even when some fail (`|| true`: xargs would stop at a cell's exit 255); the failures are
# counted from the file run_cell appends to, after the report, so that the finished cells are recorded all the same.
export FAILURES
FAILURES=$(mktemp)
trap 'rm -f "$FAILURES"' EXIT
xargs -P "$JOBS" -L 1 bash -c 'run_cell "$0" "$1" || true' <<< "$list"

if [ "$what" = tune ]; then
  python experiments.py choose
else
  python experiments.py report
  if [ "$what" = figure1 ] || [ "$what" = all ]; then python experiments.py figure1 || true; fi  # matplotlib: optional
fi
failed=$(wc -l < "$FAILURES")
if [ "$failed" -gt 0 ]; then
  echo "run_all.sh: $failed of $count cells FAILED (their FAILED lines above name their logs)" >&2
  exit 1
fi
echo "all $count cells done"
