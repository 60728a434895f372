#!/usr/bin/env bash
# The main job on the bundled default: a tiny Llama with a D2-LoRA adapter on every linear layer.
# inspect -> merge (streamed, float64, atomic) + verify (weights, then outputs against the adapter).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
echo "== d2export inspect fixtures/demo/adapter"
d2export inspect fixtures/demo/adapter
echo
echo "== d2export merge fixtures/demo/adapter --out $OUT/merged --force --verify"
d2export merge fixtures/demo/adapter --out "$OUT/merged" --force --verify
ls -l "$OUT/merged"
