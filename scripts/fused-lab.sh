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

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
base=""
if [ "${1:-}" = "--base" ]; then
    base="${2:-}"
    [ -n "$base" ] || { echo "fused-lab: --base needs a revision" >&2; exit 2; }
    git rev-parse --verify --quiet "$base^{commit}" > /dev/null || { echo "fused-lab: no commit \`$base\`" >&2; exit 2; }
    shift 2
fi
mc="${1:-8192}"
pairs="${2:-40}"
threads="${3:-2}"
if ! [[ "$mc" =~ ^[0-9]+$ && "$pairs" =~ ^[0-9]+$ && "$threads" =~ ^[0-9]+$ ]] \
    || (( mc < 16 || pairs < 1 || threads < 1 )); then
    echo "fused-lab: M_C at least 16, PAIRS and THREADS at least 1 (got $mc $pairs $threads)" >&2
    exit 2
fi
llvm=/usr/lib/llvm-22/bin
for tool in mlir-opt mlir-translate opt llc; do
    [ -x "$llvm/$tool" ] || { echo "fused-lab: $llvm/$tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
for tool in gcc objcopy; do
    command -v "$tool" > /dev/null || { echo "fused-lab: needs $tool" >&2; exit 1; }
done

work="$(mktemp -d)"
cleanup() {
    if [ -n "$base" ] && [ -d "$work/base" ]; then
        git worktree remove --force "$work/base" > /dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# The step's pass pipeline, as src/lower/cpu/mod.rs spells it.
pipeline="$(sed -n '/^pub const CPU_PIPELINE/,/;$/p' src/lower/cpu/mod.rs | tr -d '\n\\"' | sed 's/^[^=]*= *//; s/;$//')"
case "$pipeline" in
    builtin.module\(*) ;;
    *) echo "fused-lab: CPU_PIPELINE not found in src/lower/cpu/mod.rs" >&2; exit 1 ;;
esac

# dump TREE FUSED DIR: the cpu_step bench's bifurcated module built in
# TREE with BIFURC_CPU_FUSED_ATTENTION=FUSED, into DIR.
dump() {
    echo "dumping the cpu_step bench's module ($1, fused attention $2)"
    (cd "$1" && BIFURC_CPU_FUSED_ATTENTION="$2" BIFURC_BENCH_DUMP="$3" BIFURC_BENCH_POINTS=32 BIFURC_BENCH_RUNS=1 \
        BIFURC_BENCH_THREADS=1 BIFURC_BENCH_CONTEXT=64 cargo bench --bench cpu_step > "$3.log" 2>&1) \
        || { cat "$3.log" >&2; exit 1; }
}

# object DIR SIDE NAME=KERNEL...: DIR's module compiled as the step
# does (its pipeline, then LLVM at -O3 for this CPU), with only the
# KERNELs global, each renamed SIDE_NAME.
object() {
    local dir="$1" side="$2" keep=() rename=()
    shift 2
    for pair in "$@"; do
        keep+=(-G "${pair#*=}")
        rename+=(--redefine-sym "${pair#*=}=${side}_${pair%%=*}")
    done
    "$llvm/mlir-opt" --pass-pipeline="$pipeline" "$dir/bifurcated_cpu.mlir" -o "$dir/llvm.mlir"
    "$llvm/mlir-translate" --mlir-to-llvmir "$dir/llvm.mlir" -o "$dir/module.ll"
    # The target named: without it LLVM vectorizes no loop it vectorizes
    # itself.
    "$llvm/opt" -O3 -mtriple=x86_64-unknown-linux-gnu -mcpu=native "$dir/module.ll" -o "$dir/module.bc"
    "$llvm/llc" -O3 -mtriple=x86_64-unknown-linux-gnu -mcpu=native -relocation-model=pic -filetype=obj "$dir/module.bc" -o "$dir/module.o"
    objcopy "${keep[@]}" "$dir/module.o" "$dir/kept.o"
    objcopy "${rename[@]}" "$dir/kept.o" "$dir/$side.o"
}

kernel() { grep -o "@k[0-9]*_l0_$2(" "$1/bifurcated_cpu.mlir" | head -1 | tr -d '@(' ; }
params() { grep -o "@$2([^)]*)" "$1/bifurcated_cpu.mlir" | grep -o '%[bcd][0-9]*' | tr '\n' ' '; }

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
    git worktree add --detach --quiet "$work/base" "$base"
    # The base's build shares this tree's target dir (its dependencies
    # built once).
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}" dump "$work/base" on "$work/base_dump"
    fused "$work/base_dump" B
    other="$work/base_dump"
    flags=()
    echo "A: this tree's fused kernel and merge; B: $base's"
else
    mkdir -p "$work/three"
    dump "$root" off "$work/three"
    qk="$(kernel "$work/three" attn_scores_einsum1)"
    sm="$(kernel "$work/three" attn_probs)"
    wv="$(kernel "$work/three" attn_context_einsum1)"
    [ -n "$qk" ] && [ -n "$sm" ] && [ -n "$wv" ] || { echo "fused-lab: layer 0's three kernels not found" >&2; exit 1; }
    # The q·K's scores must be what the softmax writes over and what the
    # w·V reads (its second buffer).
    read -r -a a <<< "$(params "$work/three" "$qk")"
    read -r -a s <<< "$(params "$work/three" "$sm")"
    read -r -a w <<< "$(params "$work/three" "$wv")"
    if [ "${#a[@]}" -ne 7 ] || [ "${#s[@]}" -ne 6 ] || [ "${#w[@]}" -ne 7 ] \
        || [ "${a[6]}" != "${s[3]}" ] || [ "${s[3]}" != "${w[5]}" ]; then
        echo "fused-lab: $qk, $sm and $wv are not of the form fused_lab.c calls: ${a[*]} / ${s[*]} / ${w[*]}" >&2
        exit 1
    fi
    object "$work/three" B "qk=$qk" "sm=$sm" "wv=$wv"
    other="$work/three"
    flags=(-DB_THREE)
    echo "A: the fused kernel and merge; B: the three kernels"
fi
gcc -O2 -fopenmp "${flags[@]}" scripts/fused_lab.c "$work/this/A.o" "$other/B.o" -lm \
    -o "$work/lab"
OMP_NUM_THREADS="$threads" "$work/lab" "$mc" "$pairs"
