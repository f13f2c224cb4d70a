#!/usr/bin/env bash
# The main job on the built-in shapes suite: dVAE (then its decoder fine-tuned on the codes it
# emits) -> CLIP -> DALL-E transformer -> generate with guidance and CLIP reranking, then the
# measured caption fidelity. Outputs under runs/demo/.
#
#   make demo                      # what the README's quickstart runs
#   DEMO_DIR=/tmp/d launch/demo.sh # elsewhere
#
# Each stage resumes from its workdir, so an interrupted demo picks up where it stopped.
#
# One training process keeps ~1.7 of the 2 cores busy (compiles, Python between steps and XLA
# kernels too small to split leave the rest idle), so stages that do not depend on each other run
# side by side: CLIP (which needs no other stage) trains alongside the dVAE, the decoder
# fine-tuning (which changes no token) alongside the DALL-E, and the two fidelity scores beside
# generation. Every number comes out the same as run one at a time (same computations, same
# seeds), ~1.5 minutes sooner (docs/generate.md, "Stages side by side").
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# jax 0.12 uses this CPU's bf16 matrix units; nothing to download at run time.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

# Each stage trains its config's default steps, except two the demo shortens for its 20-minute
# budget: the decoder fine-tuning runs 3000 steps of batch 4 and CLIP 250 steps (the configs'
# defaults, 12000 steps of batch 8 and 400 steps, cost ~20 minutes more in sequence; README).
# Neither touches the DALL-E or its tokens: the decoder only draws them, CLIP only ranks the
# samples. Extra flags per stage, applied after these: DVAE_ARGS / DECODER_ARGS / CLIP_ARGS /
# DALLE_ARGS (e.g. DALLE_ARGS=--config.total_steps=6000, DECODER_ARGS="--config.batch_size=8
# --config.total_steps=12000" for the config's decoder); SAMPLING replaces the sampling flags of
# stages 5-6.
DEMO_DECODER_FLAGS="--config.batch_size=4 --config.total_steps=3000"
DEMO_CLIP_FLAGS="--config.total_steps=250"
DVAE_ARGS=${DVAE_ARGS:-}
DECODER_ARGS=${DECODER_ARGS:-}
CLIP_ARGS=${CLIP_ARGS:-}
DALLE_ARGS=${DALLE_ARGS:-}
DECODER_FINETUNE=${DECODER_FINETUNE:-1}
case "$DECODER_FINETUNE" in
  0|1) ;;
  *) echo "error: DECODER_FINETUNE must be 0 or 1, got '$DECODER_FINETUNE'" >&2; exit 2 ;;
esac

stage() { printf '\n=== %s (%s) ===\n' "$1" "$(date +%H:%M:%S)"; }
start=$(date +%s)

# Background stages: output to a log, shown when the stage is collected; an interrupted or failed
# demo stops them (no orphan keeps training).
BG_PIDS=()
trap 'for p in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do kill "$p" 2>/dev/null || true; done' EXIT
background() {  # LOG CMD...: runs CMD in the background; its pid ends up in $BG
  local log=$1; shift
  "$@" > "$log" 2>&1 &
  BG=$!
  BG_PIDS+=("$BG")
}
collect() {  # NAME PID LOG: waits for a background stage; fails the demo if it failed
  local rc=0
  wait "$2" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "error: $1 failed (exit $rc); the end of its log, $3:" >&2
    tail -n 30 "$3" >&2
    exit 1
  fi
}

stage "1/6 CLIP: contrastive image-text training, in the background (log: $OUT/clip.log)"
background "$OUT/clip.log" "$PY" -m clip_jax.train --config configs/clip_shapes.py --workdir "$OUT/clip" \
  $DEMO_CLIP_FLAGS ${CLIP_ARGS:-}
CLIP_PID=$BG

stage "2/6 dVAE: 64x64 images -> 8x8 tokens"
"$PY" -m dalle_jax.train_dvae --config configs/dvae_shapes.py --workdir "$OUT/dvae" ${DVAE_ARGS:-}

# The joint run's decoder learnt from relaxed codes; trained alone on the argmax codes inference
# uses, it draws shapes the checker reads right far more often (triangles above all), while the
# frozen encoder keeps every token as it was (docs/dvae.md, "Decoder fine-tuning"). Since the
# tokens do not change, it trains in the background beside the DALL-E, which encodes with the
# joint dVAE's (identical) encoder; attach_decoder then checks the two encoders are bit for bit
# the same and makes the DALL-E's samples decode with the fine-tuned decoder.
# DECODER_FINETUNE=0 skips it (the DALL-E then decodes with the joint decoder).
if [ "$DECODER_FINETUNE" = 1 ]; then
  stage "3/6 dVAE decoder fine-tuning: same tokens, sharper images; in the background (log: $OUT/dvae_decoder.log)"
  background "$OUT/dvae_decoder.log" "$PY" -m dalle_jax.train_dvae --config configs/dvae_shapes_decoder.py \
    --workdir "$OUT/dvae_decoder" --config.init_from="$OUT/dvae" $DEMO_DECODER_FLAGS ${DECODER_ARGS:-}
  DECODER_PID=$BG
fi

# Collected before the DALL-E, so a failed CLIP stops the demo before its longest stage; it has
# long finished by now (2.5 minutes alone, ~4 beside the dVAE).
collect "CLIP training" "$CLIP_PID" "$OUT/clip.log"
echo "CLIP trained (from $OUT/clip.log):"
grep -E '^(resumed from|eval |step )' "$OUT/clip.log" | tail -n 2 || true

stage "4/6 DALL-E transformer on dVAE tokens"
"$PY" -m dalle_jax.train --config configs/dalle_shapes.py --workdir "$OUT/dalle" \
  --config.dvae_workdir="$OUT/dvae" ${DALLE_ARGS:-}

if [ "$DECODER_FINETUNE" = 1 ]; then
  collect "dVAE decoder fine-tuning" "$DECODER_PID" "$OUT/dvae_decoder.log"
  echo "decoder fine-tuned (from $OUT/dvae_decoder.log):"
  grep -E '^(resumed from|eval )' "$OUT/dvae_decoder.log" | tail -n 2 || true
  "$PY" -m dalle_jax.attach_decoder --workdir "$OUT/dalle" --dvae_workdir "$OUT/dvae_decoder"
fi

# Nucleus sampling (top_p 0.7) for both generation and the fidelity score: on the demo's models it
# raised the mean fidelity of a sample from 0.68 / 0.43 to 0.79 / 0.55 (seen / unseen captions,
# 96 prompts x 16 samples; docs/generate.md, "Sampling settings").
SAMPLING=${SAMPLING:---cond_scale 3 --top_p 0.7}

# The fidelity scores (stage 6) need only the trained models, so they start now, beside generation.
SPLITS=(test_seen test_unseen)
FID_PIDS=()
for split in "${SPLITS[@]}"; do
  background "$OUT/fidelity_$split.log" "$PY" -m dalle_jax.evaluate_fidelity --workdir "$OUT/dalle" \
    --clip_workdir "$OUT/clip" --split "$split" --num_prompts ${FIDELITY_PROMPTS:-24} --num_samples 16 \
    $SAMPLING --dvae_ceiling --out "$OUT/fidelity_$split.json"
  FID_PIDS+=("$BG")
done

stage "5/6 generate ($SAMPLING), best 4 of 16 by CLIP"
cat > "$OUT/prompts.txt" <<'EOF'
a red circle in the top left
a blue triangle below a yellow square
a purple square in the center
a green square to the right of a white circle
a red triangle in the bottom right
a green circle above a blue triangle
EOF
"$PY" -m dalle_jax.generate --workdir "$OUT/dalle" --prompts_file "$OUT/prompts.txt" \
  --num_samples 16 --top_k_rerank 4 --clip_workdir "$OUT/clip" $SAMPLING --seed 0 \
  --out_dir "$OUT/samples"
"$PY" -m dalle_jax.contact_sheet --samples_dir "$OUT/samples" --out "$OUT/samples/sheet.png"

stage "6/6 caption fidelity (shapes checker) on seen and unseen captions, and the dVAE's ceiling"
for i in "${!SPLITS[@]}"; do
  split=${SPLITS[$i]}
  collect "caption fidelity on $split" "${FID_PIDS[$i]}" "$OUT/fidelity_$split.log"
  cat "$OUT/fidelity_$split.log"
done

echo
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min; outputs in $OUT/"
echo "  samples: $OUT/samples/sheet.png, $OUT/samples/NNN/ (best 4 of 16 per caption, with the checker's verdict)"
echo "  metrics: $OUT/{dvae,dvae_decoder,clip,dalle}/metrics.jsonl, TensorBoard: tensorboard --logdir $OUT"
