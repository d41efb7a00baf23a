#!/usr/bin/env bash
# The project's main job on an example: import a Hugging Face config
# (Llama-2-7B) into a decode graph, then inspect it at a shared-prefix shape
# point (32 samples, 8192-token context, 256 decoded tokens).
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
