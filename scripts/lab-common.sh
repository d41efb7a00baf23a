# shellcheck shell=bash
# Shared by the kernel labs (scripts/fused-lab.sh, scripts/projection-lab.sh,
# scripts/attention-lab.sh):
# the cpu_step bench's module dumped from this tree or another revision,
# its kernels compiled as the step compiles them and linked into a C
# driver under names of their own. Source it from the repository root
# with LAB set to the lab's name (for messages); it parses `--base REV`
# off the arguments into `base` and leaves the rest in `lab_args`.

# shellcheck source=scripts/env.sh
source scripts/env.sh
root="$(pwd)"
base=""
lab_args=("$@")
if [ "${1:-}" = "--base" ]; then
    base="${2:-}"
    [ -n "$base" ] || { echo "$LAB: --base needs a revision" >&2; exit 2; }
    git rev-parse --verify --quiet "$base^{commit}" > /dev/null || { echo "$LAB: no commit \`$base\`" >&2; exit 2; }
    lab_args=("${@:3}")
fi
llvm=/usr/lib/llvm-22/bin
for tool in mlir-opt mlir-translate opt llc; do
    [ -x "$llvm/$tool" ] || { echo "$LAB: $llvm/$tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
for tool in gcc objcopy; do
    command -v "$tool" > /dev/null || { echo "$LAB: needs $tool" >&2; exit 1; }
done

work="$(mktemp -d)"
lab_cleanup() {
    if [ -d "$work/base" ]; then
        git worktree remove --force "$work/base" > /dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap lab_cleanup EXIT

# The step's pass pipeline, as src/lower/cpu/mod.rs spells it.
pipeline="$(sed -n '/^pub const CPU_PIPELINE/,/;$/p' src/lower/cpu/mod.rs | tr -d '\n\\"' | sed 's/^[^=]*= *//; s/;$//')"
case "$pipeline" in
    builtin.module\(*) ;;
    *) echo "$LAB: CPU_PIPELINE not found in src/lower/cpu/mod.rs" >&2; exit 1 ;;
esac

# dump TREE FUSED DIR: the cpu_step bench's bifurcated module built in
# TREE with BIFURC_CPU_FUSED_ATTENTION=FUSED, into DIR; the model in
# $lab_dtype (the bench's BIFURC_BENCH_DTYPE) where a lab sets it, else
# f32; the first 2 layers of the Hugging Face config $lab_config (an
# absolute path: the bench's BIFURC_BENCH_CONFIG, its dtype its own)
# where a lab sets it, else the bench's own model.
dump() {
    echo "dumping the cpu_step bench's module ($1, fused attention $2)"
    (cd "$1" && BIFURC_CPU_FUSED_ATTENTION="$2" BIFURC_BENCH_DUMP="$3" BIFURC_BENCH_POINTS=32 BIFURC_BENCH_RUNS=0 \
        BIFURC_BENCH_THREADS=1 BIFURC_BENCH_CONTEXT=64 BIFURC_BENCH_DTYPE="${lab_dtype:-float32}" \
        env ${lab_config:+BIFURC_BENCH_CONFIG="$lab_config"} cargo bench --bench cpu_step > "$3.log" 2>&1) \
        || { cat "$3.log" >&2; exit 1; }
}

# dump_base FUSED DIR: `dump` of revision $base, checked out in a
# worktree and built in a target dir of its own (`lab-base` in this
# tree's, kept between runs: its dependencies built once, about 1.7 GB;
# `cargo clean` removes it). Not in this tree's: cargo names a
# workspace's artifacts by their paths inside the workspace, so the
# worktree's build would replace this tree's with files newer than this
# tree's sources, and this tree's next build would take them as fresh
# and dump $base's kernels as its own.
dump_base() {
    git worktree add --detach --quiet "$work/base" "$base"
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/lab-base" dump "$work/base" "$1" "$2"
}

# same_code A.o B.o: whether the two objects' machine code is the same
# (their kernels differ only in their names): said, so that a run of
# --base against a revision of the same kernels is not read as a change.
same_code() {
    objcopy -O binary --only-section=.text "$1" "$work/a.text"
    objcopy -O binary --only-section=.text "$2" "$work/b.text"
    if cmp -s "$work/a.text" "$work/b.text"; then
        echo "$LAB: A and B are the same machine code ($base's kernels are this tree's)"
    fi
}

# object DIR SIDE NAME=KERNEL...: DIR's module compiled as the step
# does (its pipeline, then LLVM at -O3 for this CPU) into DIR/SIDE.o,
# with only the KERNELs global, each renamed SIDE_NAME.
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
    "$llvm/llc" -O3 -mtriple=x86_64-unknown-linux-gnu -mcpu=native -relocation-model=pic -filetype=obj \
        "$dir/module.bc" -o "$dir/module.o"
    objcopy "${keep[@]}" "$dir/module.o" "$dir/kept.o"
    objcopy "${rename[@]}" "$dir/kept.o" "$dir/$side.o"
}

# kernel DIR NAME: the first layer-0 kernel of DIR's module named NAME.
kernel() { grep -o "@k[0-9]*_l0_$2(" "$1/bifurcated_cpu.mlir" | head -1 | tr -d '@(' ; }
# params DIR KERNEL: its dims, capacities and buffers, in order.
params() { grep -o "@$2([^)]*)" "$1/bifurcated_cpu.mlir" | grep -o '%[bcd][0-9]*' | tr '\n' ' '; }

# three_kernels DIR SIDE: layer 0's context q·K, softmax over the scores
# and w·V of DIR's module, checked to be the form the C drivers call (b,
# m_c, m_d, m_c's capacity, K, q, the scores; b, m_c, m_d, the scores,
# the decode scores, the new one; b, m_c, m_d, m_c's capacity, V, the
# scores, the output: the q·K's scores what the softmax writes over and
# what the w·V reads), as SIDE.o (SIDE_qk, SIDE_sm, SIDE_wv).
three_kernels() {
    local qk sm wv a s w
    qk="$(kernel "$1" attn_scores_einsum1)"
    sm="$(kernel "$1" attn_probs)"
    wv="$(kernel "$1" attn_context_einsum1)"
    [ -n "$qk" ] && [ -n "$sm" ] && [ -n "$wv" ] || { echo "$LAB: layer 0's three kernels not found in $1" >&2; exit 1; }
    read -r -a a <<< "$(params "$1" "$qk")"
    read -r -a s <<< "$(params "$1" "$sm")"
    read -r -a w <<< "$(params "$1" "$wv")"
    if [ "${#a[@]}" -ne 7 ] || [ "${#s[@]}" -ne 6 ] || [ "${#w[@]}" -ne 7 ] \
        || [ "${a[6]}" != "${s[3]}" ] || [ "${s[3]}" != "${w[5]}" ]; then
        echo "$LAB: $qk, $sm and $wv are not of the form the driver calls: ${a[*]} / ${s[*]} / ${w[*]}" >&2
        exit 1
    fi
    object "$1" "$2" "qk=$qk" "sm=$sm" "wv=$wv"
}
