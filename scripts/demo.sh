#!/usr/bin/env bash
# The project's main job on an example: import a Hugging Face config
# (Llama-2-7B) into a decode graph, inspect it at a shared-prefix shape point
# (32 samples, 8192-token context, 256 decoded tokens), bifurcate it, and
# compile it to PTX + manifest for sm_90; then compile the tiny example and
# run it on this machine's CPU (fill a 512-token context, 8 samples x 16 steps).
#
# Outputs go to target/demo/ under the repository root: a fixed, repo-relative
# place (even when CARGO_TARGET_DIR points elsewhere), ignored by git.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

echo "demo: cargo build --release"
cargo build --release -q

out=target/demo
mkdir -p "$out"

echo "demo: import-hf examples/llama-2-7b/config.json -> $out/llama-2-7b.json"
cargo run --release -q -- import-hf examples/llama-2-7b/config.json -o "$out/llama-2-7b.json"

echo "demo: inspect $out/llama-2-7b.json at b=32, m_c=8192, m_d=256"
cargo run --release -q -- inspect "$out/llama-2-7b.json" --shape b=32,m_c=8192,m_d=256

echo "demo: optimize -> $out/llama-2-7b.opt.json"
cargo run --release -q -- optimize "$out/llama-2-7b.json" -o "$out/llama-2-7b.opt.json" --shape b=32,m_c=8192,m_d=256

echo "demo: compile -> $out/llama-2-7b.ptx (+ manifest) for sm_90"
cargo run --release -q -- compile "$out/llama-2-7b.json" -o "$out/llama-2-7b.ptx" --target sm_90 --shape b=32,m_c=8192,m_d=256

echo "demo: compile examples/tiny -> $out/tiny.ptx, then run it on the CPU"
cargo run --release -q -- compile examples/tiny/model.json -o "$out/tiny.ptx" --shape b=8,m_c=512,m_d=16
cargo run --release -q -- run "$out/tiny.ptx" --random-weights --context-len 512 --samples 8 --steps 16 --temperature 0.8 --seed 1 --device cpu
