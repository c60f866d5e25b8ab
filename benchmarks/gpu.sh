#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on an H100), numbers written as JSON to $OUT (default runs/gpu):
#   1. the CuPy test cases (pytest -m gpu),
#   2. one epoch of LeNet-300-100 and LeNet-5, sparsenet (CUDA graphs, then eager) vs PyTorch CUDA,
#   3. one training iteration of AlexNet (batch 128) and VGG-16 (batch 32) vs PyTorch CUDA,
#   4. sparse vs dense inference on the GPU (bench_sparse.py),
#   5. `sparsenet reproduce lenet-300-100 --device gpu`, wall time and result.
# MNIST comes from $SPARSENET_DATA (default ./data, which must hold mnist/). Test it on the CPU with
# GPU_SH_DRY=1 (every step with --device cpu and tiny sizes) before spending GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH=. SPARSENET_DATA="${SPARSENET_DATA:-data}" SPARSENET_OFFLINE=1
DEV=gpu; EPOCH=60000; ALEX=128; VGG=32; SECS=1.0; EXP=lenet-300-100
if [ "${GPU_SH_DRY:-0}" = 1 ]; then DEV=cpu; EPOCH=640; ALEX=2; VGG=1; SECS=0.05; EXP=lenet-300-100-ci; fi
step() { echo "== $1 ($(date +%T))"; }

step "1. CuPy test cases"
if [ "$DEV" = gpu ]; then
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1
  echo "{\"rc\": $?, \"summary\": \"$(tail -1 "$OUT/pytest_gpu.txt")\"}" > "$OUT/pytest_gpu.json"
fi

step "2. LeNet epochs vs PyTorch"
timeout 150 python3 benchmarks/bench_train.py --device "$DEV" --epochs-of "$EPOCH" --json "$OUT/bench_train.json"

step "3. AlexNet and VGG-16 iterations vs PyTorch"
timeout 150 python3 benchmarks/bench_imagenet.py --device "$DEV" --torch --repeat 3 \
  --model alexnet --batch "$ALEX" --model vgg-16 --batch "$VGG" > "$OUT/bench_imagenet.jsonl"

step "4. sparse inference"
timeout 90 python3 benchmarks/bench_sparse.py --device "$DEV" --seconds "$SECS" --json "$OUT/bench_sparse.json"

step "5. reproduce $EXP"
rm -rf "$OUT/reproduce"  # a fresh run, never a resumed one
start=$(date +%s.%N)
timeout 240 python3 -m sparsenet reproduce "$EXP" --device "$DEV" --out "$OUT/reproduce" --no-progress \
  > "$OUT/reproduce.txt" 2>&1
rc=$?
python3 - "$OUT" "$rc" "$start" <<'EOF'
import json, sys, time, pathlib
out, rc, start = pathlib.Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
m = out / "reproduce" / "metrics.json"
r = {"rc": rc, "wall_s": round(time.time() - start, 1)}
if m.is_file():
    d = json.loads(m.read_text())
    r.update(test_error=d["pruned"]["test_error"], compression=d["pruned"]["compression"], seconds=d["seconds"])
(out / "reproduce.json").write_text(json.dumps(r) + "\n")
print(r)
EOF
step "done"
