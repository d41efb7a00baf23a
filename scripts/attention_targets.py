#!/usr/bin/env python3
"""The issue's two GPU targets, from one gpu-check run:

1. the bifurcated attention step within 2x of the HBM time for the bytes it
   must move;
2. faster than PyTorch SDPA over the batch-expanded cache at b >= 16.

Reads `bifurc-run bench`'s per-kernel profile of an artifact (profile-*.csv,
profile-dims.json: the shape it was taken at), the artifact's manifest (each
kernel's node and its bytes as expressions of the runtime dims) and, for 2,
torch_attention_bench.py's CSV at the same shape.

Attention kernels: those computing an attention site's node (the manifest's
`attention[].node`, e.g. `l0.attn.scores`) or a node the optimizer split from
it (`l0.attn.scores.einsum1`, ...), and the softmax kernels. Their summed
device time per step, divided by the number of layers, is one layer's
attention; their summed bytes at the shape, over the HBM bandwidth, is the
HBM time. The bandwidth is the datasheet peak of the device (by name), and,
where PyTorch can measure it, a device-to-device copy's.

Usage: attention_targets.py --bench DIR --manifest M.manifest.json
       [--label bifurcated] [--torch torch_attention.csv] [--out targets.md]
Exit status 0 when every target that could be evaluated holds, 1 when one
fails, 2 when nothing could be evaluated.
"""

import argparse
import csv
import json
import math
import os
import re
import sys

# Datasheet HBM bandwidth, bytes/s, by a substring of the device name.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
]


def eval_size(expr, dims):
    """A manifest size (an int, or an expression of dims with + - * /,
    parentheses, ceil() and floor()) at `dims`."""
    if isinstance(expr, (int, float)):
        return float(expr)
    text = str(expr)
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/() ]+", text):
        raise ValueError(f"unexpected size expression {text!r}")
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)) - {"ceil", "floor"}
    missing = names - set(dims)
    if missing:
        raise ValueError(f"size {text!r} needs {sorted(missing)}")
    scope = dict(dims, ceil=math.ceil, floor=math.floor)
    return float(eval(text, {"__builtins__": {}}, scope))


def attention_kernels(manifest):
    sites = [s["node"] for s in manifest.get("attention", [])]
    picked = []
    for k in manifest["kernels"]:
        node = k["node"]
        if k["op"] == "softmax" or any(node == s or node.startswith(s + ".") for s in sites):
            picked.append(k)
    layers = len({re.match(r"([^.]*)\.", s).group(1) for s in sites if re.match(r"([^.]*)\.", s)}) or 1
    return picked, layers


def peak_bandwidth(device):
    for key, bw in PEAK_BANDWIDTH:
        if key in device:
            return bw
    return None


def measured_bandwidth():
    """Device-to-device copy bandwidth (read + write bytes / time), or None."""
    try:
        import torch
    except ImportError:
        return None, "no torch"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    n = 1 << 28  # 1 GiB of f32
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 4 * n / times[len(times) // 2], torch.cuda.get_device_name()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="bifurc-run bench --out directory")
    ap.add_argument("--manifest", required=True, help="the profiled artifact's manifest")
    ap.add_argument("--label", default="bifurcated", help="which profile: baseline or bifurcated")
    ap.add_argument("--torch", help="torch_attention.csv of the same model")
    ap.add_argument("--device", default="", help="device name (default: from torch)")
    ap.add_argument("--out", help="write the markdown here too")
    args = ap.parse_args()

    lines, status = [f"# Attention targets ({args.label})", ""], 0
    dims_path = os.path.join(args.bench, "profile-dims.json")
    prof_path = os.path.join(args.bench, f"profile-{args.label}.csv")
    if not (os.path.exists(dims_path) and os.path.exists(prof_path)):
        print(f"no profile in {args.bench} (the bench did not reach it)")
        return 2
    dims = json.load(open(dims_path))["dims"]
    manifest = json.load(open(args.manifest))
    times = {row["kernel"]: float(row["ms"]) for row in csv.DictReader(open(prof_path))}
    kernels, layers = attention_kernels(manifest)
    missing = [k["name"] for k in kernels if k["name"] not in times and eval_size(k["grid"][0], dims) > 0]
    if missing:
        print(f"profile lacks attention kernels {missing}")
        return 2
    ms = sum(times.get(k["name"], 0.0) for k in kernels)
    nbytes = sum(eval_size(k["bytes"]["total"], dims) for k in kernels)
    shape = ", ".join(f"{k}={v}" for k, v in sorted(dims.items()))
    lines.append(f"- shape: {shape}; {len(kernels)} attention kernels over {layers} layers "
                 f"({', '.join(sorted({k['op'] for k in kernels}))})")
    lines.append(f"- attention per step: {ms:.3f} ms, {nbytes / 1e6:.1f} MB moved "
                 f"({nbytes / (ms * 1e-3) / 1e9:.0f} GB/s); per layer {ms / layers:.3f} ms")

    measured, name = measured_bandwidth()
    device = args.device or (name if measured else "")
    peak = peak_bandwidth(device)
    evaluated = False
    for what, bw in (("datasheet peak", peak), ("measured copy", measured)):
        if not bw:
            continue
        hbm_ms = nbytes / bw * 1e3
        ratio = ms / hbm_ms
        ok = ratio <= 2.0
        evaluated = True
        status = status or (0 if ok else 1)
        lines.append(f"- target 1, within 2x of HBM time ({what} {bw / 1e12:.2f} TB/s): HBM time {hbm_ms:.3f} ms, "
                     f"measured {ratio:.2f}x of it: **{'met' if ok else 'not met'}**")
    if not evaluated:
        lines.append(f"- target 1: no bandwidth for device {device!r} (not in the table, no torch)")

    # Where the attention time goes: each kernel (summed over layers) with
    # the bytes the manifest gives it, so the slowest against its bytes stand out.
    roles = {}
    for k in kernels:
        role = re.sub(r"^k\d+_(l\d+_)?", "", k["name"])
        t, b = roles.get(role, (0.0, 0.0))
        roles[role] = (t + times.get(k["name"], 0.0), b + eval_size(k["bytes"]["total"], dims))
    bw = peak or measured
    lines += ["", "| kernel (summed over layers) | ms | MB | GB/s | of HBM peak |", "|---|---:|---:|---:|---:|"]
    for role, (t, b) in sorted(roles.items(), key=lambda kv: -kv[1][0]):
        gbs = b / (t * 1e-3) / 1e9 if t > 0 else 0.0
        share = f"{100 * gbs * 1e9 / bw:.0f}%" if bw and t > 0 else "-"
        lines.append(f"| {role} | {t:.3f} | {b / 1e6:.1f} | {gbs:.0f} | {share} |")

    if args.torch and os.path.exists(args.torch):
        rows = [r for r in csv.DictReader(open(args.torch)) if r.get("standard_ms")]
        same = [r for r in rows if int(r["b"]) == dims.get("b") and int(r["m_c"]) == dims.get("m_c")
                and int(r["m_d"]) == dims.get("m_d")]
        if same and dims.get("b", 0) >= 16:
            sdpa = float(same[0]["standard_ms"])
            ok = ms / layers < sdpa
            evaluated = True
            status = status or (0 if ok else 1)
            lines.append(f"- target 2, faster than SDPA on the expanded cache at b >= 16: one layer "
                         f"{ms / layers:.3f} ms vs SDPA {sdpa:.3f} ms ({sdpa / (ms / layers):.2f}x): "
                         f"**{'met' if ok else 'not met'}**")
        else:
            lines.append(f"- target 2: no SDPA time at {shape} with b >= 16 in {args.torch}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return status if evaluated else 2


if __name__ == "__main__":
    sys.exit(main())
