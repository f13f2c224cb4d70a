#!/usr/bin/env bash
# Quality of the shapes pipeline against training budget: trains the dVAE, CLIP and DALL-E shapes
# configs at their default steps and at multiples of them, and reports dVAE PSNR / codebook use and
# DALL-E caption fidelity (seen and unseen captions, with the dVAE-reconstruction ceiling) for each.
# Meant for an accelerator (each run is independent; several share one GPU), but runs anywhere.
#
#   bash bench/shapes_budget.sh OUT_DIR
#   DVAE_MULTS="1 4" DALLE_MULTS="1 4 16" bash bench/shapes_budget.sh OUT_DIR   # the defaults
#
# DVAE_ARGS / CLIP_ARGS / DALLE_ARGS add flags to every run of that stage (after the step counts).
# Writes OUT_DIR/summary.txt (a block per run) next to each run's workdir, log and fidelity JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/shapes_budget.sh OUT_DIR}
DVAE_MULTS=${DVAE_MULTS:-1 4}
DALLE_MULTS=${DALLE_MULTS:-1 4 16}
PY=${PYTHON:-python3}
PROMPTS=${FIDELITY_PROMPTS:-48}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

steps() { "$PY" -c "import sys; from core_jax.app import load_config; print(load_config(sys.argv[1]).total_steps)" "$1"; }
DV=$(steps dvae_shapes); DA=$(steps dalle_shapes)

run_dvae() {  # $1 = multiplier
  local w="$OUT/dvae_x$1" n=$(( DV * $1 ))
  local t0=$(date +%s)
  "$PY" -m dalle_jax.train_dvae --config configs/dvae_shapes.py --workdir "$w" \
    --config.total_steps=$n --config.model.temperature_anneal_steps=$n --config.eval_every=$n \
    --config.checkpoint_every=$n ${DVAE_ARGS:-} > "$w.log" 2>&1
  echo "dvae x$1 ($n steps): $(( $(date +%s) - t0 )) s; $(grep '"eval/' "$w/metrics.jsonl" | tail -n 1)" >> "$OUT/summary.txt"
}
run_dalle() {  # $1 = dvae multiplier, $2 = dalle multiplier
  local w="$OUT/dalle_d$1_x$2" n=$(( DA * $2 ))
  if [ ! -d "$OUT/dvae_x$1/checkpoints" ]; then
    echo "dalle x$2 on dvae x$1: skipped, the dVAE run failed (see $OUT/dvae_x$1.log)" >> "$OUT/summary.txt"
    return
  fi
  local t0=$(date +%s)
  "$PY" -m dalle_jax.train --config configs/dalle_shapes.py --workdir "$w" \
    --config.dvae_workdir="$OUT/dvae_x$1" --config.total_steps=$n --config.eval_every=$n \
    --config.checkpoint_every=$n ${DALLE_ARGS:-} > "$w.log" 2>&1
  local t1=$(date +%s)
  for split in test_seen test_unseen; do
    "$PY" -m dalle_jax.evaluate_fidelity --workdir "$w" --clip_workdir "$OUT/clip" --split $split \
      --num_prompts "$PROMPTS" --num_samples 16 --cond_scale 3 --dvae_ceiling \
      --out "$w.fidelity_$split.json" >> "$w.log" 2>&1
  done
  echo "dalle x$2 on dvae x$1 ($n steps): train $(( t1 - t0 )) s" >> "$OUT/summary.txt"
  for split in test_seen test_unseen; do
    "$PY" -c "import json,sys; from dalle_jax.evaluate_fidelity import format_table as f; print(f(json.load(open(sys.argv[1]))))" \
      "$w.fidelity_$split.json" >> "$OUT/summary.txt" 2>/dev/null \
      || echo "  $split: no fidelity report (see $w.log)" >> "$OUT/summary.txt"
  done
}

"$PY" -m clip_jax.train --config configs/clip_shapes.py --workdir "$OUT/clip" ${CLIP_ARGS:-} > "$OUT/clip.log" 2>&1 \
  || echo "clip: FAILED (see $OUT/clip.log)" >> "$OUT/summary.txt" &
for m in $DVAE_MULTS; do run_dvae "$m" & done
wait
for d in $DVAE_MULTS; do for m in $DALLE_MULTS; do run_dalle "$d" "$m" & done; done
wait
cat "$OUT/summary.txt"
