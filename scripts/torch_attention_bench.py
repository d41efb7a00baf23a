#!/usr/bin/env python3
"""Times one decode-attention layer of a model's shape in PyTorch, two ways:

- standard: F.scaled_dot_product_attention over the batch-expanded KV cache
  [b, g, m_c + m_d, k] (what a framework without prefix sharing holds: the
  context rows copied per sample);
- bifurcated: the paper's einsum form, the context part read once for all
  samples ("bgpnk,gmk->bgpnm" against the shared [g, m_c, k] cache), the
  decode part per sample, one softmax over both, then the two w.V einsums.

Both compute the same attention (checked with allclose). Times are CUDA-event
medians of one attention call (no projections, no other layers). Writes
OUT/torch_attention.csv and OUT/torch_attention.md.

Usage: torch_attention_bench.py --config config.json --out DIR
       [--samples 1,16,32] [--context 2048,8192] [--decoded 256] [--repeats 20] [--dtype bf16]
"""

import argparse
import json
import math
import os
import sys
import time


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="Hugging Face config.json of the model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=ints, default=[1, 16, 32])
    ap.add_argument("--context", type=ints, default=[2048, 8192])
    ap.add_argument("--decoded", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop starting new shapes after this long")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("error: torch sees no CUDA device", file=sys.stderr)
        return 1
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    cfg = json.load(open(args.config))
    h = cfg.get("num_attention_heads") or cfg["n_head"]
    g = cfg.get("num_key_value_heads") or (1 if cfg.get("multi_query") else h)
    d_model = cfg.get("hidden_size") or cfg["n_embd"]
    k = cfg.get("head_dim") or d_model // h
    p = h // g
    m_d = args.decoded
    dev = torch.device("cuda")
    scale = 1.0 / math.sqrt(k)
    es = torch.finfo(dtype).bits // 8
    props = torch.cuda.get_device_properties(dev)
    started = time.time()

    def timed(fn, repeats):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            a = torch.cuda.Event(enable_timing=True)
            b_ = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b_.record()
            b_.synchronize()
            times.append(a.elapsed_time(b_))
        times.sort()
        n = len(times)
        return times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])

    rows = []
    for m_c in args.context:
        for b in args.samples:
            row = {"b": b, "m_c": m_c, "m_d": m_d}
            if time.time() - started > args.budget_s:
                row["note"] = "time budget spent"
                rows.append(row)
                continue
            # KV bytes read per call (K and V): standard reads the expanded cache.
            row["standard_kv_bytes"] = 2 * b * g * (m_c + m_d) * k * es
            row["bifurcated_kv_bytes"] = 2 * g * (m_c + b * m_d) * k * es
            need = 2 * (b * g * (m_c + m_d) * k + g * m_c * k + b * g * m_d * k) * es
            free, _ = torch.cuda.mem_get_info()
            if need > 0.8 * free:
                row["note"] = f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                rows.append(row)
                continue
            try:
                torch.manual_seed(0)
                q = torch.randn(b, h, 1, k, device=dev, dtype=dtype)
                k_ctx = torch.randn(g, m_c, k, device=dev, dtype=dtype)
                v_ctx = torch.randn(g, m_c, k, device=dev, dtype=dtype)
                k_dec = torch.randn(b, g, m_d, k, device=dev, dtype=dtype)
                v_dec = torch.randn(b, g, m_d, k, device=dev, dtype=dtype)
                # The per-sample cache a framework without prefix sharing holds.
                k_all = torch.cat([k_ctx.expand(b, g, m_c, k), k_dec], dim=2).contiguous()
                v_all = torch.cat([v_ctx.expand(b, g, m_c, k), v_dec], dim=2).contiguous()

                def standard():
                    return F.scaled_dot_product_attention(q, k_all, v_all, scale=scale, enable_gqa=(g != h))

                qg = q.view(b, g, p, 1, k)

                def bifurcated():
                    s_c = torch.einsum("bgpnk,gmk->bgpnm", qg, k_ctx)
                    s_d = torch.einsum("bgpnk,bgmk->bgpnm", qg, k_dec)
                    w = torch.softmax(torch.cat([s_c, s_d], dim=-1).float() * scale, dim=-1).to(dtype)
                    o = torch.einsum("bgpnm,gmk->bgpnk", w[..., :m_c], v_ctx)
                    o = o + torch.einsum("bgpnm,bgmk->bgpnk", w[..., m_c:], v_dec)
                    return o.reshape(b, h, 1, k)

                ref = standard().float()
                got = bifurcated().float()
                row["max_abs_diff"] = (ref - got).abs().max().item()
                row["allclose"] = bool(torch.allclose(ref, got, atol=3e-2, rtol=3e-2))
                row["standard_ms"] = timed(standard, args.repeats)
                row["bifurcated_ms"] = timed(bifurcated, args.repeats)
                row["speedup"] = row["standard_ms"] / row["bifurcated_ms"]
                row["predicted_speedup"] = row["standard_kv_bytes"] / row["bifurcated_kv_bytes"]
                for name in ("standard", "bifurcated"):
                    row[f"{name}_gbps"] = row[f"{name}_kv_bytes"] / (row[f"{name}_ms"] * 1e6)
                del q, k_ctx, v_ctx, k_dec, v_dec, k_all, v_all
            except Exception as e:  # out of memory, an op missing in this torch, ...
                row["note"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)

    cols = ["b", "m_c", "m_d", "standard_ms", "bifurcated_ms", "speedup", "predicted_speedup",
            "standard_kv_bytes", "bifurcated_kv_bytes", "standard_gbps", "bifurcated_gbps",
            "max_abs_diff", "allclose", "note"]
    with open(os.path.join(args.out, "torch_attention.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join('"%s"' % r[c] if c == "note" and c in r else str(r.get(c, "")) for c in cols) + "\n")

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else ""

    with open(os.path.join(args.out, "torch_attention.md"), "w") as f:
        f.write("# PyTorch: one decode-attention layer\n\n")
        f.write(f"- device: {props.name}; torch {torch.__version__}; dtype {args.dtype}\n")
        f.write(f"- shape: h={h}, g={g}, k={k} (from {args.config}), m_d={m_d}\n")
        f.write("- standard: SDPA over the batch-expanded cache [b, g, m_c+m_d, k]; bifurcated: einsum "
                "'bgpnk,gmk->bgpnm' on the shared context + the decode part, one softmax\n")
        f.write(f"- CUDA-event median of {args.repeats} calls after 3 warm-ups; predicted = KV bytes ratio\n\n")
        f.write("| b | m_c | standard ms | bifurcated ms | speedup | predicted | GB/s std | GB/s bif | max diff | note |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
        for r in rows:
            f.write("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n".format(
                r["b"], r["m_c"], fmt(r.get("standard_ms"), ".3f"), fmt(r.get("bifurcated_ms"), ".3f"),
                fmt(r.get("speedup"), ".2f"), fmt(r.get("predicted_speedup"), ".2f"),
                fmt(r.get("standard_gbps"), ".0f"), fmt(r.get("bifurcated_gbps"), ".0f"),
                fmt(r.get("max_abs_diff"), ".2e"), r.get("note", "")))
    print(f"wrote {args.out}/torch_attention.csv and torch_attention.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
