#!/usr/bin/env bash
# Times layer 0's fused context attention (the fused kernel and its
# merge, src/lower/emit/fused.rs) against the step's three kernels (q·K,
# the softmax over the scores, w·V), or, with --base REV, against the
# fused kernel and merge of revision REV, both linked from the modules
# the cpu_step bench dumps, in pairs on the same data (scripts/fused_lab.c;
# docs/DESIGN.md, "Lowering"). Runs on a build machine with gcc (OpenMP)
# on any x86-64 CPU; not in CI. A on the left is this tree's fused
# kernel; the ratio printed is B / A per pair (above 1: this tree's
# faster).
#
#   scripts/fused-lab.sh [--base REV] [M_C] [PAIRS] [THREADS]   (default 8192 40 2)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAB=fused-lab
# shellcheck source=scripts/lab-common.sh
source scripts/lab-common.sh
mc="${lab_args[0]:-8192}"
pairs="${lab_args[1]:-40}"
threads="${lab_args[2]:-2}"
if ! [[ "$mc" =~ ^[0-9]+$ && "$pairs" =~ ^[0-9]+$ && "$threads" =~ ^[0-9]+$ ]] \
    || (( mc < 16 || pairs < 1 || threads < 1 )); then
    echo "fused-lab: M_C at least 16, PAIRS and THREADS at least 1 (got $mc $pairs $threads)" >&2
    exit 2
fi

# fused DIR SIDE: the fused kernel and its merge of DIR's module, checked
# to be the form fused_lab.c calls (b, m_c, m_d, m_c's capacity, K, V, q,
# the partials; b, m_c, m_d, the decode scores, the new one, the
# partials, the output), as SIDE.o.
fused() {
    local qk merge
    qk="$(kernel "$1" attn_scores_einsum1_fused)"
    merge="$(kernel "$1" attn_probs)"
    [ -n "$qk" ] && [ -n "$merge" ] || { echo "fused-lab: layer 0's fused kernel or merge not found in $1" >&2; exit 1; }
    read -r -a a <<< "$(params "$1" "$qk")"
    read -r -a m <<< "$(params "$1" "$merge")"
    if [ "${#a[@]}" -ne 8 ] || [ "${#m[@]}" -ne 7 ] || [ "${a[7]}" != "${m[5]}" ]; then
        echo "fused-lab: $qk and $merge are not of the form fused_lab.c calls: ${a[*]} / ${m[*]}" >&2
        exit 1
    fi
    object "$1" "$2" "qk=$qk" "merge=$merge"
}

mkdir -p "$work/this"
dump "$root" on "$work/this"
fused "$work/this" A
if [ -n "$base" ]; then
    dump_base on "$work/base_dump"
    fused "$work/base_dump" B
    same_code "$work/this/A.o" "$work/base_dump/B.o"
    other="$work/base_dump"
    flags=()
    echo "A: this tree's fused kernel and merge; B: $base's"
else
    mkdir -p "$work/three"
    dump "$root" off "$work/three"
    three_kernels "$work/three" B
    other="$work/three"
    flags=(-DB_THREE)
    echo "A: the fused kernel and merge; B: the three kernels"
fi
gcc -O2 -fopenmp "${flags[@]}" scripts/fused_lab.c "$work/this/A.o" "$other/B.o" -lm \
    -o "$work/lab"
OMP_NUM_THREADS="$threads" "$work/lab" "$mc" "$pairs"
