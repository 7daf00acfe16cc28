#!/bin/bash
# The paper presets on a GPU machine, in one short session (about 5 min on an H200).
#
#   OUT=/some/dir bash bench/gpu_presets.sh
#
# 1. renders phantoms in parallel (bench/gpu_phantoms.py): 72 training images
#    (seeds 1000-1011), 6 validation images (seed 2000), 8 test images (seed 3000)
#    and one full-field image (seed 5000);
# 2. times the bundled cascade per stage on the GPU (bench/accuracy.py --device cuda);
# 3. trains the paper presets side by side for TRAIN_S seconds each: the ASN
#    (t-test loss, sigmoid head, width 32, 250 iterations per epoch) and the FPR
#    (ResNet-50 width 64 at 224 px on the bundled U-Net's candidates, FPR_ARGS).
# Logs and the ASN's best checkpoint land in OUT; bench/gpu_report.py reads them.
#
# Variables: OUT (required), TRAIN_S (default 230), VAL (val | test: the validation
# manifest of both trainings; the first 6 images of seed 2000 hold no µC, so use
# test), VAL_COUNT (validation images of seed 2000, default 6; 16 = make weights' set),
# FPR_ARGS (e.g. "--optimizer adam"), SKIP_ACC=1 (skip step 2),
# PRESET (paper; tiny for a CPU dry run with DEV=cpu), PARTS and PER (training images
# = PARTS × PER), PY (python3).
# Without pydicom and the pylibjpeg plugins on the machine, carry their wheels in .whl/.
set -u
: "${OUT:?set OUT to the output folder}"
PRESET=${PRESET:-paper}; PARTS=${PARTS:-12}; PER=${PER:-6}; TRAIN_S=${TRAIN_S:-230}
DEV=${DEV:-cuda}; PY=${PY:-python3}; VAL=${VAL:-test}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if [ -d .whl ] && [ "$DEV" != cpu ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
(nvidia-smi -L; nproc; $PY -c "import torch; print('torch', torch.__version__)") \
  > "$OUT/machine.txt" 2>&1
D=/tmp/gpu-presets-data; R=/tmp/gpu-presets-runs; rm -rf $D $R
el phantoms
timeout 120 $PY bench/gpu_phantoms.py $D $PARTS $PER ${VAL_COUNT:-6} 2>&1 | grep -v " INFO " | tee "$OUT/gen.log"
if [ -z "${SKIP_ACC:-}" ]; then
  el "detection timing"
  timeout 150 $PY bench/accuracy.py --device $DEV --manifest $D/test/manifest.jsonl \
    --full-manifest $D/full/manifest.jsonl --out "$OUT/accuracy_gpu.json" --no-readme \
    > "$OUT/accuracy.log" 2>&1 || echo "accuracy failed: see $OUT/accuracy.log"
fi
el training
OMP_NUM_THREADS=6 timeout $TRAIN_S $PY -m node.cli train asn --preset $PRESET \
  --manifest $D/train/manifest.jsonl --val-manifest $D/$VAL/manifest.jsonl \
  --out $R/asn-paper --epochs 40 --iterations 250 --quiet --device $DEV \
  > "$OUT/asn_paper.log" 2>&1 &
OMP_NUM_THREADS=6 timeout $TRAIN_S $PY -m node.cli train fpr --preset $PRESET \
  --asn cascade/weights/asn.pt --manifest $D/train/manifest.jsonl \
  --val-manifest $D/$VAL/manifest.jsonl --out $R/fpr-paper ${FPR_ARGS:-} --quiet \
  --device $DEV > "$OUT/fpr_paper.log" 2>&1 &
wait
el done
[ -f $R/asn-paper/best.pt ] && cp $R/asn-paper/best.pt "$OUT/asn_paper_best.pt"
true
