#!/usr/bin/env bash
# Issue 10's GPU measurements in one prepared call of about 8 minutes (the device tool allows 10 per
# command and 15 per session). From the repository root, after ../shared/tools/device_prep.sh (which
# fetches diffusers / PEFT / LyCORIS wheels into .whl/ and prints the install prefix):
#
#   run(carry=[".whl"], command='<prefix printed by device_prep.sh> bash benchmarks/gpu_run.sh')
#
# Writes under $OUT (the device tool's folder that comes back): unet.{json,txt} (every eager row),
# unet_compiled.{json,txt} (the compiled SD1.5 row; SDXL's 722-layer inductor compile would not fit),
# load_fuse.txt (fp16 load / fuse / unfuse against diffusers' LoRA), train.{json,txt} (benchmarks/bench_train.py:
# a training step per flow family and base precision; train_full: FLUX.1 at full size; train_compiled: two families eager and
# compiled,
# LoKr / PEFT / LyCORIS against the bare step) and env.txt.
# `bash benchmarks/gpu_run.sh --cpu` runs the same steps on tiny models on the CPU (a dry run).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu" ]; then
  unet=(--tiny --device cpu --repeats 1 --warmup 1); compiled_backend=(--compile-backend eager); fuse=()
else
  unet=(--device cuda --repeats 10); compiled_backend=(); fuse=(--device cuda --dtype fp16 --repeats 3)
fi
python3 - > "$OUT/env.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
timeout 330 python3 benchmarks/bench_unet.py "${unet[@]}" --no-compile --json "$OUT/unet.json" 2>&1 \
  | grep -v "it/s" | tee "$OUT/unet.txt" | grep "^|"
timeout 150 python3 benchmarks/bench_unet.py "${unet[@]}" "${compiled_backend[@]}" --only "SD1.5 inference compiled" \
  --json "$OUT/unet_compiled.json" 2>&1 | grep -v "it/s" | tee "$OUT/unet_compiled.txt" | grep "^|"
if [ "${1:-}" != "--cpu" ]; then
  timeout 100 python3 benchmarks/bench_load_fuse.py "${fuse[@]}" 2>&1 | grep -v "it/s" | tee "$OUT/load_fuse.txt" \
    | grep -A4 "^SD1.5"
fi
# one training step of each flow family's tiny pipeline, LoKr and PEFT against the bare step, at each base precision
# (peak memory on CUDA); the full-size rows need the models' weights and are not run here
if [ "${1:-}" = "--cpu" ]; then train=(--device cpu --families flux wan --precisions none fp8 --repeats 1); else
  train=(--device cuda --repeats 5); fi
timeout 200 python3 benchmarks/bench_train.py "${train[@]}" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt" \
  | grep "^|"
# FLUX.1 [dev]'s transformer at full size (random weights, bf16, 512 px): bare / LoKr / PEFT / LyCORIS, peak memory
if [ "${1:-}" = "--cpu" ]; then full=(--device cpu --full-blocks 1 --tokens 16 --repeats 1); else
  full=(--device cuda --repeats 5); fi
timeout 300 python3 benchmarks/bench_train.py --full flux1-dev "${full[@]}" --json "$OUT/train_full.json" 2>&1 \
  | tee "$OUT/train_full.txt" | grep "^|"
# the same step compiled as diffusers users compile for training (compile_repeated_blocks), two families
timeout 150 python3 benchmarks/bench_train.py "${train[@]}" --families flux qwenimage --precisions none --compile \
  --json "$OUT/train_compiled.json" 2>&1 | tee "$OUT/train_compiled.txt" | grep "^|"
