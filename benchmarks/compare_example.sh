#!/usr/bin/env bash
# The guide's worked example (docs/GUIDE.md, "Claiming that A beats B"): three variants, five seeds each,
# trained on the demo data's `bilinear` generator, validated on `nearest` (kept out of training), and
# tested on data/demo/test, where `transposed_conv` is a generator that neither training nor validation saw.
# Run it from the project folder after `python rine_plus_ssca.py --demo` (about 10 minutes on 2 CPU cores).
#   bash benchmarks/compare_example.sh [SCRIPT]    (SCRIPT defaults to ./rine_plus_ssca.py)
set -euo pipefail
SCRIPT=${1:-rine_plus_ssca.py}
COMMON=(--data-dir data/demo --clip-model checkpoints/demo/tiny_clip_backbone --train-classes bilinear
        --val-classes nearest --epochs 4 --batch-size 32 --proj-dim 128 --spec-channels 64 --fusion-dim 128
        --fusion-heads 4 --num-workers 2 --cache-features --cache-dir runs/cache --seeds 0,1,2,3,4)
python "$SCRIPT" "${COMMON[@]}" --checkpoint-dir runs/full
python "$SCRIPT" "${COMMON[@]}" --checkpoint-dir runs/rine --no-use-spectral
python "$SCRIPT" "${COMMON[@]}" --checkpoint-dir runs/any_crops --train-recipe rine
for variant in full rine any_crops; do
  python "$SCRIPT" eval --ckpt runs/$variant/seed_*/best_rine_plus_ssca.pth --data data/demo/test --out runs/eval_$variant
done
python "$SCRIPT" compare --a runs/full/seed_*/best_rine_plus_ssca.pth --b runs/rine/seed_*/best_rine_plus_ssca.pth \
  --names full rine --data data/demo/test --out runs
python "$SCRIPT" compare --a runs/full/seed_*/best_rine_plus_ssca.pth --b runs/any_crops/seed_*/best_rine_plus_ssca.pth \
  --names grid_crops any_crops --data data/demo/test --out runs
