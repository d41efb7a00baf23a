#!/usr/bin/env bash
# A lab for the CPU's context attention (docs/DESIGN.md, "Lowering": the
# prototype of the fused kernel since built in src/lower/emit/fused.rs,
# which a step runs from 32 query rows a KV head). Runs on a build
# machine, not in CI: it needs
# gcc with OpenMP and a CPU with AVX-512 (the prototype's intrinsics).
#
# Dumps the cpu_step bench's bifurcated module (the f32 2-layer llama,
# 16 heads of 64, compiled at b = 32; its first plan, without the fused
# kernel: bifurcated_cpu.mlir), takes layer 0's three context
# attention kernels (the q·K, the softmax written over the scores, the
# w·V) and compiles them as the step does (CPU_PIPELINE, then LLVM at -O3
# for this CPU), links them with scripts/attention_lab.c, a C prototype of
# the fused kernel (the online softmax over blocks of K and V, the scores
# never stored), and times both on the same data, K and V flushed from
# the caches before every run, then prints the largest difference of
# their outputs (and fails if it is past 1e-4 of the largest output).
#
#   scripts/attention-lab.sh [M_C] [ROUNDS] [THREADS]     (default 8192 6 2)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
mc="${1:-8192}"
rounds="${2:-6}"
threads="${3:-2}"
if ! [[ "$mc" =~ ^[0-9]+$ && "$rounds" =~ ^[0-9]+$ && "$threads" =~ ^[0-9]+$ ]] \
    || (( mc < 16 || mc % 16 != 0 || rounds < 1 || threads < 1 )); then
    echo "attention-lab: M_C is a multiple of 16 from 16, ROUNDS and THREADS at least 1 (got $mc $rounds $threads)" >&2
    exit 2
fi
llvm=/usr/lib/llvm-22/bin
for tool in mlir-opt mlir-translate opt llc; do
    [ -x "$llvm/$tool" ] || { echo "attention-lab: $llvm/$tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
command -v gcc > /dev/null || { echo "attention-lab: needs gcc (with OpenMP)" >&2; exit 1; }
grep -q avx512f /proc/cpuinfo || { echo "attention-lab: the prototype needs AVX-512" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "dumping the cpu_step bench's modules (cargo bench --bench cpu_step)"
BIFURC_BENCH_DUMP="$work" BIFURC_BENCH_POINTS=32 BIFURC_BENCH_RUNS=1 BIFURC_BENCH_CONTEXT=64 \
    cargo bench --bench cpu_step > "$work/bench.log" 2>&1 || { cat "$work/bench.log" >&2; exit 1; }
module="$work/bifurcated_cpu.mlir"

# The step's pass pipeline, as src/lower/cpu/mod.rs spells it.
pipeline="$(sed -n '/^pub const CPU_PIPELINE/,/;$/p' src/lower/cpu/mod.rs | tr -d '\n\\"' | sed 's/^[^=]*= *//; s/;$//')"
case "$pipeline" in
    builtin.module\(*) ;;
    *) echo "attention-lab: CPU_PIPELINE not found in src/lower/cpu/mod.rs" >&2; exit 1 ;;
esac

# Layer 0's kernels, and their buffers: the q·K's scores must be what the
# softmax writes over and what the w·V reads (its second buffer).
kernel() { grep -o "@k[0-9]*_l0_$1(" "$module" | head -1 | tr -d '@(' ; }
buffers() { grep -o "@$1([^)]*)" "$module" | grep -o '%b[0-9]*' | tr '\n' ' '; }
qk="$(kernel attn_scores_einsum1)"
sm="$(kernel attn_probs)"
wv="$(kernel attn_context_einsum1)"
[ -n "$qk" ] && [ -n "$sm" ] && [ -n "$wv" ] || { echo "attention-lab: layer 0's kernels not found in $module" >&2; exit 1; }
read -r _ _ qk_scores <<< "$(buffers "$qk")"
read -r sm_scores _ _ <<< "$(buffers "$sm")"
read -r _ wv_probs _ <<< "$(buffers "$wv")"
if [ "$qk_scores" != "$sm_scores" ] || [ "$sm_scores" != "$wv_probs" ]; then
    echo "attention-lab: $qk, $sm and $wv do not share the scores buffer as expected:" >&2
    echo "  $(buffers "$qk") / $(buffers "$sm") / $(buffers "$wv")" >&2
    exit 1
fi

echo "compiling $qk, $sm, $wv"
"$llvm/mlir-opt" --pass-pipeline="$pipeline" "$module" -o "$work/llvm.mlir"
"$llvm/mlir-translate" --mlir-to-llvmir "$work/llvm.mlir" -o "$work/module.ll"
# The target named: without it LLVM vectorizes no loop it vectorizes
# itself (the softmax's rows ran scalar, 10x slower).
triple=x86_64-unknown-linux-gnu
"$llvm/opt" -O3 -mtriple="$triple" -mcpu=native "$work/module.ll" -o "$work/module.bc"
"$llvm/llc" -O3 -mtriple="$triple" -mcpu=native -filetype=obj "$work/module.bc" -o "$work/module.o"
gcc -O3 -march=native -fopenmp -DQK="$qk" -DSM="$sm" -DWV="$wv" scripts/attention_lab.c "$work/module.o" -lm \
    -o "$work/lab"
OMP_NUM_THREADS="$threads" "$work/lab" "$mc" "$rounds"
