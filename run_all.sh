#!/usr/bin/env bash
# Reproduce the paper on one GPU: every cell of Tables 1-3 and Figure 1, then results/RESULTS.md.
#
#   ./run_all.sh                 everything (Table 1: 48 cells, Table 2: 14, Table 3: 10, Figure 1), one seed
#   ./run_all.sh table2          one table (table1, table2, table3, figure1), or `tune` for the hyperparameter search
#   JOBS=6 ./run_all.sh          cells run at once on the one GPU (default 4)
#   SEEDS=3 ./run_all.sh         seeds 1..3 of every cell; RESULTS.md then shows mean ± sd
#   DATASETS=beauty MODELS=sasrec ./run_all.sh table1      narrowed
#   SLURM_ARRAY_TASK_ID=N ./run_all.sh table1                only the N-th cell of that list (a Slurm array task;
#                                                            see the README), no report
#
# Resumable: a finished cell is skipped, an interrupted one resumes from its last epoch; just run it again.
# Logs: runs/logs/<cell>-seed<seed>.log. `tune` ends with `python experiments.py choose`, which rewrites
# results/hyperparameters.tsv, the per-cell settings every table reads.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-all}
JOBS=${JOBS:-4}
SEEDS=${SEEDS:-1}
DATASETS=${DATASETS:-beauty,toys,sports,yelp}
MODELS=${MODELS:-gru4rec,caser,sasrec}
DEVICE=${DEVICE:-}
# Each job gets its share of the CPU threads (data stays on the GPU; the CPU only launches kernels).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
mkdir -p runs/logs

run_cell() {  # cell seed; returns the cell's exit status (experiments.py: 0 also when another process has it)
  local log="runs/logs/$(echo "$1" | tr '/,=' '_.-')-seed$2.log"
  if python experiments.py run "$1" --seed "$2" ${DEVICE:+--device "$DEVICE"} >> "$log" 2>&1; then
    echo "done    $1 seed $2"
  else
    echo "FAILED  $1 seed $2 (see $log)"
    return 1
  fi
}
export -f run_cell
export DEVICE

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # one array task: the cell on line SLURM_ARRAY_TASK_ID of the list
  cell=$(python experiments.py list "$what" --datasets "$DATASETS" --models "$MODELS" --seeds "$SEEDS" |
         sed -n "${SLURM_ARRAY_TASK_ID}p")
  if [ -z "$cell" ]; then
    echo "task $SLURM_ARRAY_TASK_ID: the list of '$what' is shorter; nothing to do"
    exit 0
  fi
  run_cell $cell
  exit
fi

python experiments.py list "$what" --datasets "$DATASETS" --models "$MODELS" --seeds "$SEEDS" |
  xargs -P "$JOBS" -L 1 bash -c 'run_cell "$0" "$1" || true'

if [ "$what" = tune ]; then
  python experiments.py choose
else
  python experiments.py report
  if [ "$what" = figure1 ] || [ "$what" = all ]; then python experiments.py figure1 || true; fi
fi
