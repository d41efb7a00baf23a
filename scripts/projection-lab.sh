#!/usr/bin/env bash
# Times one of layer 0's weight projections (`x @ Wᵀ` from W kept in
# panels, src/lower/cpu/panels.rs) of this tree against revision REV's,
# both linked from the modules the cpu_step bench dumps (the 2-layer
# llama: d_model 1024, ffn 2816), in pairs on the same data
# (scripts/projection_lab.c). Runs on a build machine with gcc (OpenMP)
# on any x86-64 CPU; not in CI. A is this tree's; the ratio printed is
# B / A per pair (above 1: this tree's faster).
#
#   scripts/projection-lab.sh --base REV [PROJECTION] [PAIRS] [THREADS] [DTYPE] [ROWS]
#
# PROJECTION: mlp_down_proj (the default), mlp_gate_proj, mlp_up_proj,
# attn_q_proj, attn_k_proj, attn_v_proj or attn_o_proj; PAIRS 200,
# THREADS 2, DTYPE f32 (or bf16 or f16: the model, its weights, input and
# output in that dtype), ROWS (b, the rows of x) 32 unless given.
#
# With PROJECTION_LAB_CONFIG=config.json (a Hugging Face llama-family
# config, e.g. examples/llama-2-7b/config.json), the projection of that
# model's first layer instead, at its sizes (hidden_size,
# intermediate_size, its KV heads for k and v), in DTYPE: weights past
# the caches, where the cpu_step model's stay in a large L3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAB=projection-lab
# shellcheck source=scripts/lab-common.sh
source scripts/lab-common.sh
[ -n "$base" ] || { echo "projection-lab: --base REV is required (this tree's projection against REV's)" >&2; exit 2; }
name="${lab_args[0]:-mlp_down_proj}"
pairs="${lab_args[1]:-200}"
threads="${lab_args[2]:-2}"
dtype="${lab_args[3]:-f32}"
rows="${lab_args[4]:-32}"
case "$dtype" in
    f32) lab_dtype=float32 ;;
    bf16) lab_dtype=bfloat16 ;;
    f16) lab_dtype=float16 ;;
    *) echo "projection-lab: DTYPE f32, bf16 or f16 (got $dtype)" >&2; exit 2 ;;
esac
# The model's sizes: d_model, the MLP's and the K/V projections' outputs
# (the cpu_step model's, benches/cpu_step.rs, or the config's).
model=(1024 2816 1024)
if [ -n "${PROJECTION_LAB_CONFIG:-}" ]; then
    [ -f "$PROJECTION_LAB_CONFIG" ] || { echo "projection-lab: no config $PROJECTION_LAB_CONFIG" >&2; exit 2; }
    lab_config="$work/config.json"
    read -r -a model < <(python3 - "$PROJECTION_LAB_CONFIG" "$lab_dtype" "$lab_config" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["torch_dtype"] = sys.argv[2]
json.dump(c, open(sys.argv[3], "w"))
d, heads = c["hidden_size"], c["num_attention_heads"]
print(d, c["intermediate_size"], c.get("num_key_value_heads", heads) * c.get("head_dim", d // heads))
PY
    ) || { echo "projection-lab: cannot read the sizes of $PROJECTION_LAB_CONFIG" >&2; exit 2; }
fi
# The projection's inputs and outputs.
case "$name" in
    mlp_down_proj) sizes=("${model[1]}" "${model[0]}") ;;
    mlp_gate_proj | mlp_up_proj) sizes=("${model[0]}" "${model[1]}") ;;
    attn_q_proj | attn_o_proj) sizes=("${model[0]}" "${model[0]}") ;;
    attn_k_proj | attn_v_proj) sizes=("${model[0]}" "${model[2]}") ;;
    *) echo "projection-lab: no projection \`$name\` (see the usage at the top of $0)" >&2; exit 2 ;;
esac
if ! [[ "$pairs" =~ ^[0-9]+$ && "$threads" =~ ^[0-9]+$ && "$rows" =~ ^[0-9]+$ ]] \
    || (( pairs < 1 || threads < 1 || rows < 1 )); then
    echo "projection-lab: PAIRS, THREADS and ROWS at least 1 (got $pairs $threads $rows)" >&2
    exit 2
fi

# projection DIR SIDE: layer 0's projection NAME of DIR's module, checked
# to be the form projection_lab.c calls (b, m_c, m_d, W, x, the output),
# as SIDE.o.
projection() {
    local k
    k="$(kernel "$1" "${name}_panels")"
    [ -n "$k" ] || { echo "projection-lab: layer 0's ${name}_panels not found in $1" >&2; exit 1; }
    read -r -a a <<< "$(params "$1" "$k")"
    if [ "${#a[@]}" -ne 6 ] || [[ "${a[3]}${a[4]}${a[5]}" != %b*%b*%b* ]]; then
        echo "projection-lab: $k is not of the form projection_lab.c calls: ${a[*]}" >&2
        exit 1
    fi
    object "$1" "$2" "proj=$k"
}

mkdir -p "$work/this"
dump "$root" auto "$work/this"
projection "$work/this" A
dump_base auto "$work/base_dump"
projection "$work/base_dump" B
same_code "$work/this/A.o" "$work/base_dump/B.o"
echo "A: this tree's $name ($dtype, $rows rows); B: $base's"
gcc -O2 -fopenmp scripts/projection_lab.c "$work/this/A.o" "$work/base_dump/B.o" -lm -o "$work/lab"
OMP_NUM_THREADS="$threads" "$work/lab" "${sizes[@]}" "$pairs" "$dtype" "$rows"
