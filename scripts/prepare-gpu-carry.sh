#!/usr/bin/env bash
# Runs HERE (the build machine: Rust, LLVM/MLIR 22, no GPU). Builds carry/,
# everything scripts/gpu-check.sh needs on a GPU machine that has no Rust
# toolchain and no package registry (see docs/gpu-machine.md):
#
#   carry/bifurc-run                      runtime-only binary (release, stripped; no MLIR)
#   carry/llama-2-7b-l2-{base,bif}.ptx    Llama-2-7B shapes, first 2 layers, bf16:
#   carry/llama-2-7b-l2-{base,bif}.manifest.json   baseline (--no-bifurcate) and
#                                         bifurcated at b=32, m_c=8192, m_d=256
#   carry/llama-2-7b-l2.config.json       the HF config (for the PyTorch bench)
#   carry/tiny-{base,bif}.ptx + manifests examples/tiny, f32 (a quick correctness check)
#   carry/tiny-cpu.json                   the CPU backend's greedy tokens, when `bifurc run` exists
#   carry/CARRY.txt                       what was built, from which commit
#
#   scripts/prepare-gpu-carry.sh [CARRY_DIR]      (default: carry)
#   LAYERS=4 scripts/prepare-gpu-carry.sh         (more layers of the 7B model)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
carry="${1:-carry}"
layers="${LAYERS:-2}"
model="llama-2-7b-l$layers"
mkdir -p "$carry"

step() { printf '\n== %s\n' "$*"; }

step "runtime binary (release, cuda, no MLIR)"
cargo build --release -p bifurc-runtime --features cuda --bin bifurc-run
cp target/release/bifurc-run "$carry/bifurc-run"
strip "$carry/bifurc-run"

step "compiler"
cargo build --release --bin bifurc
bifurc="target/release/bifurc"

step "$model: import (bf16) and compile baseline + bifurcated"
"$bifurc" import-hf examples/llama-2-7b/config.json --layers "$layers" --dtype bf16 -o "$carry/$model.model.json"
"$bifurc" compile "$carry/$model.model.json" --no-bifurcate -o "$carry/$model-base.ptx"
"$bifurc" compile "$carry/$model.model.json" --shape b=32,m_c=8192,m_d=256 -o "$carry/$model-bif.ptx"
cp examples/llama-2-7b/config.json "$carry/$model.config.json"

step "tiny (f32): baseline + bifurcated"
"$bifurc" compile examples/tiny/model.json --no-bifurcate -o "$carry/tiny-base.ptx"
"$bifurc" compile examples/tiny/model.json -o "$carry/tiny-bif.ptx"

if [ -n "${BIFURC_PTXAS:-}" ]; then
    step "ptxas (sm_90)"
    for ptx in "$carry"/*.ptx; do
        "$BIFURC_PTXAS" -arch=sm_90 "$ptx" -o /dev/null
        echo "ptxas ok: $ptx"
    done
fi

step "CPU reference for the tiny model (optional)"
rm -f "$carry/tiny-cpu.json"
if "$bifurc" run --help >/dev/null 2>&1 &&
    "$bifurc" run "$carry/tiny-bif.ptx" --random-weights --seed 1 --prompt-ids 1,2,3,4,5,6,7,8 \
        --samples 4 --steps 16 --temperature 0 --json >"$carry/tiny-cpu.json.tmp" 2>/dev/null; then
    mv "$carry/tiny-cpu.json.tmp" "$carry/tiny-cpu.json"
    echo "wrote $carry/tiny-cpu.json"
else
    rm -f "$carry/tiny-cpu.json.tmp"
    echo "no CPU reference (\`bifurc run\` is missing or failed); gpu-check compares baseline vs bifurcated only"
fi

{
    echo "built: $(date -u +%FT%TZ) on $(uname -n)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "model: $model (examples/llama-2-7b/config.json, --layers $layers, bf16)"
    echo "files:"
    (cd "$carry" && ls -l | tail -n +2)
} >"$carry/CARRY.txt"
cat "$carry/CARRY.txt"
du -sh "$carry"
echo
echo "next: copy $carry/ beside the repository on the GPU machine and run scripts/gpu-check.sh OUT_DIR"
