#!/usr/bin/env bash
# A lab for the CPU's context attention (docs/DESIGN.md, "Lowering": the
# prototype of the fused kernel since built in src/lower/emit/fused.rs,
# which a step runs from 32 query rows a KV head). Runs on a build
# machine, not in CI: it needs
# gcc with OpenMP and a CPU with AVX-512 (the prototype's intrinsics).
#
# Dumps the cpu_step bench's bifurcated module (the f32 2-layer llama,
# 16 heads of 64, compiled at b = 32, without the fused kernel:
# BIFURC_CPU_FUSED_ATTENTION=off), takes layer 0's three context
# attention kernels (the q·K, the softmax written over the scores, the
# w·V) and compiles them as the step does (CPU_PIPELINE, then LLVM at -O3
# for this CPU; scripts/lab-common.sh, shared with the other labs), links
# them with scripts/attention_lab.c, a C prototype of the fused kernel
# (the online softmax over blocks of K and V, the scores never stored),
# and times both on the same data, K and V flushed from the caches before
# every run, then prints the largest difference of their outputs (and
# fails if it is past 1e-4 of the largest output).
#
#   scripts/attention-lab.sh [M_C] [ROUNDS] [THREADS]     (default 8192 6 2)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAB=attention-lab
# shellcheck source=scripts/lab-common.sh
source scripts/lab-common.sh
[ -z "$base" ] || { echo "attention-lab: takes no --base (scripts/fused-lab.sh does)" >&2; exit 2; }
mc="${lab_args[0]:-8192}"
rounds="${lab_args[1]:-6}"
threads="${lab_args[2]:-2}"
if ! [[ "$mc" =~ ^[0-9]+$ && "$rounds" =~ ^[0-9]+$ && "$threads" =~ ^[0-9]+$ ]] \
    || (( mc < 16 || mc % 16 != 0 || rounds < 1 || threads < 1 )); then
    echo "attention-lab: M_C is a multiple of 16 from 16, ROUNDS and THREADS at least 1 (got $mc $rounds $threads)" >&2
    exit 2
fi
grep -q avx512f /proc/cpuinfo || { echo "attention-lab: the prototype needs AVX-512" >&2; exit 1; }

mkdir -p "$work/three"
dump "$root" off "$work/three"
three_kernels "$work/three" T
gcc -O3 -march=native -fopenmp -DQK=T_qk -DSM=T_sm -DWV=T_wv scripts/attention_lab.c "$work/three/T.o" -lm \
    -o "$work/lab"
OMP_NUM_THREADS="$threads" "$work/lab" "$mc" "$rounds"
