#!/usr/bin/env bash
# Runs HERE (the build machine: Rust, LLVM/MLIR 22, no GPU). Builds carry/,
# everything scripts/gpu-check.sh needs on a GPU machine that has no Rust
# toolchain and no package registry (see docs/gpu-machine.md):
#
#   carry/bifurc-run                      runtime-only binary (release, stripped; no MLIR)
#   carry/runtime-cuda-tests              the runtime's CUDA test binary (runtime/tests/cuda_step.rs)
#   carry/llama-2-7b-l2-{base,bif}.ptx    Llama-2-7B shapes, first 2 layers, bf16:
#   carry/llama-2-7b-l2-{base,bif}.manifest.json   baseline (--no-bifurcate) and
#                                         bifurcated at b=32, m_c=8192, m_d=256
#   carry/llama-2-7b-l2-bif-cc.ptx + manifest   the bifurcated step with --no-tensor-cores
#                                         (every contraction on CUDA cores: the A/B for tensor cores)
#   carry/llama-2-7b-l2-bif-t-NAME.ptx + manifest   the bifurcated step compiled with each
#                                         tensor-core tuning of scripts/tuning-variants.txt
#   carry/tuning-variants.txt             that list (gpu-check benches each against the default)
#   carry/llama-2-7b-l2.config.json       the HF config (for the PyTorch bench)
#   carry/tiny-{base,bif}.ptx + manifests examples/tiny, f32 (a quick correctness check)
#   carry/wide-{base,bif}.ptx + manifests a 2-layer f32 llama with d_model 1024 (GQA 8/4
#                                         heads of 128): its projections are long enough
#                                         for the GPU's cooperative contraction kernels
#   carry/{tiny,wide}-prefill.ptx + manifests  the same models with 3 new tokens per step
#                                         (import-hf --new-tokens 3): fill the context by prefill
#   carry/wide16-{base,bif,bif-cc}.ptx + manifests  `wide` in bf16: its projections and
#                                         bifurcated context einsums run on tensor cores (bif-cc:
#                                         --no-tensor-cores)
#   carry/{tiny,wide}-cpu.json            the CPU backend's greedy tokens and last logits
#   carry/wide16-cpu.json                 the CPU backend's first decode step (tokens, logits), bf16
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

step "runtime CUDA tests (test binary, no MLIR)"
tests_json="$(cargo test --release -p bifurc-runtime --features cuda --test cuda_step --no-run --message-format=json)"
tests_bin="$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda_step" and m.get("executable"):
        print(m["executable"])
')"
[ -n "$tests_bin" ] || { echo "error: no cuda_step test binary was built" >&2; exit 1; }
cp "$tests_bin" "$carry/runtime-cuda-tests"
strip "$carry/runtime-cuda-tests"

step "compiler"
cargo build --release --bin bifurc
bifurc="target/release/bifurc"

step "$model: import (bf16) and compile baseline + bifurcated"
"$bifurc" import-hf examples/llama-2-7b/config.json --layers "$layers" --dtype bf16 -o "$carry/$model.model.json"
"$bifurc" compile "$carry/$model.model.json" --no-bifurcate -o "$carry/$model-base.ptx"
"$bifurc" compile "$carry/$model.model.json" --shape b=32,m_c=8192,m_d=256 -o "$carry/$model-bif.ptx"
"$bifurc" compile "$carry/$model.model.json" --shape b=32,m_c=8192,m_d=256 --no-tensor-cores \
    -o "$carry/$model-bif-cc.ptx"
cp examples/llama-2-7b/config.json "$carry/$model.config.json"

step "$model: the bifurcated step with each tensor-core tuning (scripts/tuning-variants.txt)"
cp scripts/tuning-variants.txt "$carry/tuning-variants.txt"
while read -r name settings; do
    "$bifurc" compile "$carry/$model.model.json" --shape b=32,m_c=8192,m_d=256 --tune "$settings" \
        -o "$carry/$model-bif-t-$name.ptx" </dev/null
done < <(sed 's/#.*//' scripts/tuning-variants.txt | awk 'NF')

step "tiny (f32): baseline + bifurcated"
"$bifurc" compile examples/tiny/model.json --no-bifurcate -o "$carry/tiny-base.ptx"
"$bifurc" compile examples/tiny/model.json -o "$carry/tiny-bif.ptx"

step "tiny prefill (3 new tokens per step)"
"$bifurc" import-hf examples/tiny/config.json --new-tokens 3 -o "$carry/tiny-prefill.model.json"
"$bifurc" compile "$carry/tiny-prefill.model.json" -o "$carry/tiny-prefill.ptx"

step "wide (f32, d_model 1024): baseline + bifurcated"
cat >"$carry/wide.config.json" <<'JSON'
{"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8,
 "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
 "rope_theta": 10000.0, "hidden_act": "silu", "max_position_embeddings": 2048, "torch_dtype": "float32"}
JSON
"$bifurc" import-hf "$carry/wide.config.json" -o "$carry/wide.model.json"
"$bifurc" compile "$carry/wide.model.json" --no-bifurcate -o "$carry/wide-base.ptx"
"$bifurc" compile "$carry/wide.model.json" -o "$carry/wide-bif.ptx"
"$bifurc" import-hf "$carry/wide.config.json" --new-tokens 3 -o "$carry/wide-prefill.model.json"
"$bifurc" compile "$carry/wide-prefill.model.json" -o "$carry/wide-prefill.ptx"

step "wide16 (wide in bf16): baseline + bifurcated, tensor cores on and off"
"$bifurc" import-hf "$carry/wide.config.json" --dtype bf16 -o "$carry/wide16.model.json"
"$bifurc" compile "$carry/wide16.model.json" --no-bifurcate -o "$carry/wide16-base.ptx"
"$bifurc" compile "$carry/wide16.model.json" -o "$carry/wide16-bif.ptx"
"$bifurc" compile "$carry/wide16.model.json" --no-tensor-cores -o "$carry/wide16-bif-cc.ptx"

if [ -n "${BIFURC_PTXAS:-}" ]; then
    step "ptxas (sm_90)"
    for ptx in "$carry"/*.ptx; do
        "$BIFURC_PTXAS" -arch=sm_90 "$ptx" -o /dev/null
        echo "ptxas ok: $ptx"
    done
fi

step "CPU references: greedy tokens and last logits of the bifurcated tiny and wide steps"
for m in tiny wide; do
    "$bifurc" run "$carry/$m-bif.ptx" --device cpu --random-weights --seed 1 --prompt-ids 1,2,3,4,5,6,7,8 \
        --samples 4 --steps 16 --temperature 0 --json --logits >"$carry/$m-cpu.json.tmp"
    mv "$carry/$m-cpu.json.tmp" "$carry/$m-cpu.json"
    echo "wrote $carry/$m-cpu.json"
done

step "CPU reference: first decode step of the bf16 wide16 model"
"$bifurc" run "$carry/wide16-bif.ptx" --device cpu --random-weights --seed 1 --prompt-ids 1,2,3,4,5,6,7,8 \
    --samples 40 --steps 1 --temperature 0 --json --logits >"$carry/wide16-cpu.json.tmp"
mv "$carry/wide16-cpu.json.tmp" "$carry/wide16-cpu.json"
echo "wrote $carry/wide16-cpu.json"

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
