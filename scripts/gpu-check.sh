#!/usr/bin/env bash
# Runs ON the GPU machine (CUDA driver, nvcc, PyTorch, Triton; no package
# registry, no Rust toolchain), from the repository root, using only what
# scripts/prepare-gpu-carry.sh put in carry/ (see docs/gpu-machine.md):
#
#   scripts/gpu-check.sh OUT_DIR            (CARRY=path overrides carry/)
#
# Steps, each under its own timeout, all within a deadline (GPU_CHECK_SECONDS,
# default 450 s: a step gets at most the time left):
#   1. environment: nvidia-smi, driver, torch versions         -> OUT/env.txt
#   2. bifurc-run info: the PTX modules load on this GPU        -> OUT/info.txt
#      and the runtime's CUDA tests (carry/runtime-cuda-tests)
#   3. small f32 models (tiny, wide), greedy: baseline and bifurcated decode
#      the same tokens (and the CPU reference's tokens and logits, when carry/
#      has one), with the decode caches appended on the device and uploaded
#      from the host                                            -> OUT/{tiny,wide}/
#   3b. bf16 model (wide16): tensor-core and CUDA-core kernels, baseline and
#      bifurcated, against the CPU reference's first decode step     -> OUT/wide16/
#   4. bifurc-run bench, baseline vs bifurcated, b in {1,16,32} x m_c in {2048,8192}
#                                                               -> OUT/bench/
#      and the bifurcated step on CUDA cores vs tensor cores     -> OUT/bench-tc/
#   5. PyTorch, one attention layer of the same shape: SDPA on the batch-expanded
#      cache vs the paper's einsum form                         -> OUT/torch/
#   5b. the issue's targets (attention within 2x of HBM time; faster than
#      SDPA at b >= 16) from the bench's profile                -> OUT/targets.md
#   5c. the decode loop as a user runs it (host included: preparing the
#      launches, reading the logits back, drawing the tokens), baseline and
#      bifurcated, b=32, m_c=8192, 32 steps at T=0.8           -> OUT/decode/
#   5d. compute-sanitizer, where the machine has it and it accepts the device:
#      memcheck and racecheck of wide16's tensor-core steps (staged tiles in
#      shared memory, vector loads) and of tiny               -> OUT/logs/sanitizer_*
#   5e. with the time left: each tensor-core tuning variant (carry/tuning-variants.txt)
#      against the default build, b=32, m_c=8192, per-kernel profiles
#                                                               -> OUT/tune/, OUT/tune.md
#   6. OUT/summary.md: everything above in one page.
# Every step runs even if an earlier one failed; the exit status is 0 only
# when all passed.
set -uo pipefail

out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
carry="${CARRY:-$root/carry}"
run="$carry/bifurc-run"
model="${MODEL:-llama-2-7b-l2}"   # carry/$model-{base,bif}.ptx, $model.config.json
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Read by the functions that steps run in a child bash (export -f).
export out carry run model
log="$out/gpu-check.log"
: >"$log"
status=0
declare -a results=() failures=()
mkdir -p "$out/logs"

deadline="${GPU_CHECK_SECONDS:-450}"

note() { printf '%s\n' "$*" | tee -a "$log"; }
# step NAME SECONDS CMD...: runs CMD under a timeout (at most the time left
# before the deadline), logs it, records pass/fail.
step() {
    local name="$1" secs="$2"
    shift 2
    local left=$((deadline - SECONDS - 15))
    if [ "$left" -lt 10 ]; then
        note "== $name: skipped, no time left before the ${deadline}s deadline"
        results+=("| $name | skipped (deadline) | 0s |")
        status=1
        return 0
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    note ""
    note "== $name (timeout ${secs}s): $*"
    local start=$SECONDS
    local steplog="$out/logs/${name//[^A-Za-z0-9]/_}.log"
    timeout --signal=TERM --kill-after=10 "$secs" "$@" </dev/null >"$steplog" 2>&1
    local rc=$?
    cat "$steplog" >>"$log"
    local took=$((SECONDS - start))
    if [ $rc -eq 0 ]; then
        results+=("| $name | ok | ${took}s |")
    else
        [ $rc -eq 124 ] && echo "(timed out after ${secs}s)" >>"$steplog" && note "$name: timed out after ${secs}s"
        results+=("| $name | FAILED (rc $rc) | ${took}s |")
        failures+=("$name|$steplog")
        status=1
    fi
    note "== $name: rc $rc, ${took}s"
    return 0
}

if [ ! -x "$run" ]; then
    note "error: $run is missing: run scripts/prepare-gpu-carry.sh on the build machine and copy carry/"
    exit 2
fi

# 1. Environment.
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    echo "carry: $carry"
    [ -f "$carry/CARRY.txt" ] && cat "$carry/CARRY.txt"
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv 2>&1
    timeout 10 nvidia-smi 2>&1 | head -20
    timeout 10 nvcc --version 2>&1 | tail -2
    timeout 30 python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >"$out/env.txt" 2>&1
note "environment: $out/env.txt"

# 2. The modules load (PTX JIT) and the device is visible.
info() {
    for ptx in "$carry/$model-base.ptx" "$carry/$model-bif.ptx" "$carry/tiny-base.ptx" "$carry/tiny-bif.ptx"; do
        "$run" info "$ptx" || return 1
    done
}
export -f info
step "load artifacts" 60 bash -c info
grep -E '^(device|artifact|kernels|device memory)' "$log" >"$out/info.txt" 2>/dev/null

# 2b. The runtime's CUDA tests (the carried test binary; fixtures from the
# repository): device-kept decode caches, grown from one row, decode like
# caches uploaded every step.
if [ -x "$carry/runtime-cuda-tests" ]; then
    # BIFURC_REQUIRE_GPU: here a test that finds no usable device fails
    # instead of skipping.
    step "runtime CUDA tests" 60 bash -c "cd '$root' && BIFURC_REQUIRE_GPU=1 '$carry/runtime-cuda-tests' --test-threads=1 --nocapture"
else
    note "== runtime CUDA tests: $carry/runtime-cuda-tests missing, skipped"
fi

# 3. Small f32 models, greedy: `tiny` (examples/tiny) and `wide` (d_model
# 1024: its projections take the GPU's cooperative one-block-per-output
# path). The baseline and the bifurcated step must decode the same tokens
# from the same prompt, with decode caches appended on the device or
# uploaded every step (--host-caches), with the context filled by a prefill
# step (3 tokens a run) or by stepping, and match the CPU reference when
# carry/ has one (tokens equal, last logits within 1e-3 norm-relative).
check_args=(--random-weights --seed 1 --prompt-ids 1,2,3,4,5,6,7,8 --samples 4 --steps 16 --temperature 0 --json --logits)
compare_model() {
    python3 - "$out/$1" "$carry/$1-cpu.json" <<'EOF'
import json, os, sys
d, cpu = sys.argv[1], sys.argv[2]
def load(name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        print("missing", path, "(that run failed)")
        return None
    return json.load(open(path))
def rel(a, b):
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    top = max(abs(y) for rb in b for y in rb)
    return diff / max(top, 1e-6)
base, bif, host, pre = load("base.json"), load("bif.json"), load("bif-host.json"), load("bif-prefill.json")
ok = None not in (base, bif, host, pre)
if ok:
    print("baseline tokens  :", base["tokens"][0])
    print("bifurcated tokens:", bif["tokens"][0])
    same = base["tokens"] == bif["tokens"]
    print("baseline == bifurcated:", same, " logits differ by %.2e (norm-relative)" % rel(bif["logits"], base["logits"]))
    ok = ok and same
    same = host["tokens"] == bif["tokens"] and host["logits"] == bif["logits"]
    print("device-appended caches == host-uploaded caches (tokens and logits):", same)
    ok = ok and same
    r = rel(pre["logits"], bif["logits"])
    same = pre["tokens"] == bif["tokens"]
    print("context by prefill (3 tokens a run) == by stepping: tokens", same, " logits differ by %.2e (bound 1e-3)" % r)
    ok = ok and same and r <= 1e-3
    if os.path.exists(cpu):
        ref = json.load(open(cpu))
        same = ref["tokens"] == bif["tokens"]
        r = rel(bif["logits"], ref["logits"])
        print("CPU reference tokens equal:", same, " logits differ by %.2e (norm-relative, bound 1e-3)" % r)
        ok = ok and same and r <= 1e-3
    else:
        print("no CPU reference", cpu)
sys.exit(0 if ok else 1)
EOF
}
export -f compare_model
for m in tiny wide; do
    [ -f "$carry/$m-bif.ptx" ] || { note "== $m: not in $carry, skipped"; continue; }
    mkdir -p "$out/$m"
    step "$m baseline" 30 "$run" run "$carry/$m-base.ptx" "${check_args[@]}" --out-json "$out/$m/base.json"
    step "$m bifurcated" 30 "$run" run "$carry/$m-bif.ptx" "${check_args[@]}" --out-json "$out/$m/bif.json"
    step "$m bifurcated, host caches" 30 "$run" run "$carry/$m-bif.ptx" "${check_args[@]}" --host-caches \
        --out-json "$out/$m/bif-host.json"
    step "$m bifurcated, prefilled" 30 "$run" run "$carry/$m-bif.ptx" "${check_args[@]}" \
        --prefill "$carry/$m-prefill.ptx" --out-json "$out/$m/bif-prefill.json"
    step "$m agrees" 20 bash -c "compare_model $m"
done
# 3b. bf16 (wide16): the tensor-core kernels (projections, attention's
# contractions; the prompt is stepped at b = 1, one row a tile, then 40
# samples decode a step: two full row tiles and a ragged one, 80 query rows
# per group in the context einsums) and the CUDA-core ones must give the CPU
# reference's first-step logits within bf16 tolerance (3e-2 norm-relative;
# tokens are reported).
compare_bf16() {
    python3 - "$out/wide16" "$carry/wide16-cpu.json" <<'EOF'
import json, os, sys
d, cpu = sys.argv[1], sys.argv[2]
def rel(a, b):
    diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    top = max(abs(y) for rb in b for y in rb)
    return diff / max(top, 1e-6)
if not os.path.exists(cpu):
    print("no CPU reference", cpu)
    sys.exit(1)
ref = json.load(open(cpu))
ok = True
for name in ("bif", "bif-cc", "base"):
    path = os.path.join(d, name + ".json")
    if not os.path.exists(path):
        print(name, ": missing (that run failed)")
        ok = False
        continue
    got = json.load(open(path))
    r = rel(got["logits"], ref["logits"])
    print("%-6s vs CPU: logits differ by %.2e (bound 3e-2), tokens equal: %s" % (name, r, got["tokens"] == ref["tokens"]))
    ok = ok and r <= 3e-2
sys.exit(0 if ok else 1)
EOF
}
export -f compare_bf16
if [ -f "$carry/wide16-bif.ptx" ]; then
    mkdir -p "$out/wide16"
    bf16_args=(--random-weights --seed 1 --prompt-ids 1,2,3,4,5,6,7,8 --samples 40 --steps 1 --temperature 0 --json --logits)
    step "wide16 bifurcated (tensor cores)" 30 "$run" run "$carry/wide16-bif.ptx" "${bf16_args[@]}" \
        --out-json "$out/wide16/bif.json"
    step "wide16 bifurcated (CUDA cores)" 30 "$run" run "$carry/wide16-bif-cc.ptx" "${bf16_args[@]}" \
        --out-json "$out/wide16/bif-cc.json"
    step "wide16 baseline (tensor cores)" 30 "$run" run "$carry/wide16-base.ptx" "${bf16_args[@]}" \
        --out-json "$out/wide16/base.json"
    step "wide16 agrees" 20 bash -c compare_bf16
fi
step "tiny sampled (T=0.8)" 30 "$run" run "$carry/tiny-bif.ptx" --random-weights --seed 1 --context-len 512 \
    --samples 32 --steps 32 --temperature 0.8 --json --out-json "$out/tiny/sampled.json"

# 4. The bench: both artifacts' whole step at each shape.
step "bifurc-run bench" 210 "$run" bench \
    --baseline "$carry/$model-base.ptx" --bifurcated "$carry/$model-bif.ptx" \
    --samples 1,16,32 --context 2048,8192 --repeats 20 --budget-s 130 --out "$out/bench"
# Tensor cores: the bifurcated step with every contraction on CUDA cores
# ("baseline" in that table) against the default (tensor cores).
if [ -f "$carry/$model-bif-cc.ptx" ]; then
    step "bench: CUDA cores vs tensor cores" 60 "$run" bench \
        --baseline "$carry/$model-bif-cc.ptx" --bifurcated "$carry/$model-bif.ptx" \
        --samples 16,32 --context 8192 --repeats 10 --budget-s 40 --no-profile --out "$out/bench-tc"
fi

# 5. PyTorch on the same shapes, one attention layer.
step "torch attention" 100 python3 "$root/scripts/torch_attention_bench.py" \
    --config "$carry/$model.config.json" --samples 1,16,32 --context 2048,8192 --decoded 256 \
    --repeats 20 --budget-s 60 --out "$out/torch"

# 5b. The issue's GPU targets from the bench's profile at its largest shape
# (attention time against the HBM time of its bytes; one layer against
# SDPA): "not met" is a finding, not a failure of the check.
targets() {
    python3 "$root/scripts/attention_targets.py" --bench "$out/bench" --manifest "$carry/$model-bif.manifest.json" \
        --torch "$out/torch/torch_attention.csv" --out "$out/targets.md"
    [ $? -le 1 ]
}
export -f targets
export root
step "attention targets" 60 bash -c targets

# 5c. The decode loop end to end, as `bifurc-run run` reports it: median
# step latency (bind + run + logits back) and tokens/s, drawing included.
mkdir -p "$out/decode"
for side in base bif; do
    step "decode loop $side (b=32, m_c=8192)" 45 "$run" run "$carry/$model-$side.ptx" --random-weights --seed 1 \
        --context-len 8192 --samples 32 --steps 32 --temperature 0.8 --json --out-json "$out/decode/$side.json"
done
decode_table() {
    python3 - "$out/decode" <<'EOF2'
import json, os, sys
d = sys.argv[1]
rows = {}
for side in ("base", "bif"):
    path = os.path.join(d, side + ".json")
    if os.path.exists(path):
        rows[side] = json.load(open(path))
if not rows:
    sys.exit(1)
print("| artifact | median ms/step | tokens/s |")
print("|---|---:|---:|")
for side, r in rows.items():
    print("| %s | %.3f | %.0f |" % (side, r["median_step_ms"], r["tokens_per_s"]))
if len(rows) == 2 and rows["bif"]["median_step_ms"] > 0:
    print()
    print("bifurcated step %.2fx faster end to end" % (rows["base"]["median_step_ms"] / rows["bif"]["median_step_ms"]))
EOF2
}
decode_table >"$out/decode/decode.md" 2>/dev/null || rm -f "$out/decode/decode.md"

# 5d. compute-sanitizer, after the measurements and before the tuning
# sweep: out-of-bounds and misaligned accesses (memcheck) and shared-memory
# races (racecheck) in the generated kernels, on the bf16 model's
# bifurcated step (a 100-token random context: staged walks and a ragged
# tail; 40 samples: full and ragged row tiles) and on tiny. Findings fail
# the step; a sanitizer that refuses this machine (some containers) is
# reported and skipped.
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
sanitize() {
    local tool="$1"
    shift
    local log
    log="$("$sanitizer" --tool "$tool" --error-exitcode 3 "$@" 2>&1)"
    local rc=$?
    printf '%s\n' "$log" | tail -n 40
    if [ $rc -ne 0 ] && [ $rc -ne 3 ] && printf '%s' "$log" | grep -qiE 'not supported|LibraryNotLoaded|unable to|failed to initialize'; then
        echo "compute-sanitizer cannot run here (rc $rc): skipped"
        return 0
    fi
    return $rc
}
export -f sanitize
export sanitizer
if [ -n "$sanitizer" ]; then
    san_args=(--random-weights --seed 1 --context-len 100 --samples 40 --steps 2 --temperature 0 --json)
    for tool in memcheck racecheck; do
        step "sanitizer $tool wide16" 45 bash -c 'sanitize "$@"' _ "$tool" "$run" run "$carry/wide16-bif.ptx" "${san_args[@]}"
    done
    step "sanitizer memcheck tiny" 30 bash -c 'sanitize "$@"' _ memcheck "$run" run "$carry/tiny-bif.ptx" "${san_args[@]}"
else
    note "== compute-sanitizer: not on this machine, skipped"
fi

# Last, so it only takes what time is left: what each tuning gains or loses.
if [ -f "$carry/tuning-variants.txt" ]; then
    while read -r name settings; do
        [ -f "$carry/$model-bif-t-$name.ptx" ] || continue
        step "tune $name ($settings)" 20 "$run" bench \
            --baseline "$carry/$model-bif.ptx" --bifurcated "$carry/$model-bif-t-$name.ptx" \
            --samples 32 --context 8192 --repeats 10 --budget-s 10 --out "$out/tune/$name"
    done < <(sed 's/#.*//' "$carry/tuning-variants.txt" | awk 'NF')
    python3 "$root/scripts/tuning_summary.py" --variants "$carry/tuning-variants.txt" --dir "$out/tune" \
        --out "$out/tune.md" >/dev/null 2>>"$log"
fi

# 6. Summary.
{
    echo "# gpu-check $(date -u +%FT%TZ)"
    echo
    echo '```'
    head -3 "$out/env.txt" | tail -2
    sed -n '/^name, driver_version/,+1p' "$out/env.txt"
    grep -E '^python ' "$out/env.txt"
    echo '```'
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${results[@]}"
    for f in "${failures[@]}"; do
        echo
        echo "### ${f%%|*}: last lines of ${f#*|}"
        echo '```'
        tail -n 8 "${f#*|}"
        echo '```'
    done
    echo
    [ -f "$out/targets.md" ] && sed 's/^# /## /' "$out/targets.md"
    echo
    [ -f "$out/bench/bench.md" ] && sed 's/^# /## /' "$out/bench/bench.md"
    [ -f "$out/bench/bench.csv" ] && [ ! -f "$out/bench/bench.md" ] && { echo '## bench (partial)'; echo '```'; cat "$out/bench/bench.csv"; echo '```'; }
    echo
    if [ -f "$out/bench-tc/bench.md" ]; then
        echo "## Tensor cores: 'baseline' = bifurcated on CUDA cores, 'bifurcated' = bifurcated on tensor cores"
        sed 's/^# /### /;s/^## /### /' "$out/bench-tc/bench.md"
    fi
    echo
    [ -f "$out/torch/torch_attention.md" ] && sed 's/^# /## /' "$out/torch/torch_attention.md"
    echo
    if [ -f "$out/decode/decode.md" ]; then
        echo "## Decode loop end to end (bifurc-run run, b=32, m_c=8192, 32 steps, T=0.8; host included)"
        echo
        cat "$out/decode/decode.md"
    fi
    echo
    [ -f "$out/tune.md" ] && sed 's/^# /## /;s/^## Kernel/### Kernel/' "$out/tune.md"
    echo
    echo "## wide16 model (bf16, first decode step vs the CPU)"
    echo '```'
    sed -n "/== wide16 agrees/,/== wide16 agrees: rc/p" "$log" | grep -v '^=='
    echo '```'
    for m in tiny wide; do
        echo "## $m model (f32, greedy, 4 samples x 16 steps)"
        echo '```'
        sed -n "/== $m agrees/,/== $m agrees: rc/p" "$log" | grep -v '^=='
        echo '```'
    done
} >"$out/summary.md" 2>&1
note ""
note "wrote $out/summary.md (log: $log)"
cat "$out/summary.md"
exit $status
