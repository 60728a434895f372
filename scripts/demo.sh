#!/usr/bin/env bash
# The main job on the bundled default: a tiny Llama with a D2-LoRA adapter on every linear layer.
# inspect -> merge (streamed, float64, atomic) + verify (weights, then outputs against the adapter)
# -> ONNX export (float32 + int8), validated with ONNX Runtime against the merged PyTorch model
# -> benchmark: unmerged (run-time adapter) vs merged vs base vs ONNX Runtime, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
echo "== d2export inspect fixtures/demo/adapter"
d2export inspect fixtures/demo/adapter
echo
echo "== d2export merge fixtures/demo/adapter --out $OUT/merged --force --verify"
d2export merge fixtures/demo/adapter --out "$OUT/merged" --force --verify
ls -l "$OUT/merged"
echo
echo "== d2export onnx $OUT/merged --out $OUT/onnx --force --quantize int8"
d2export onnx "$OUT/merged" --out "$OUT/onnx" --force --quantize int8
ls -l "$OUT/onnx"
echo
echo "== d2export bench $OUT/merged --adapter fixtures/demo/adapter --onnx $OUT/onnx --plot $OUT/bench.png"
d2export bench "$OUT/merged" --adapter fixtures/demo/adapter --onnx "$OUT/onnx" --plot "$OUT/bench.png"
