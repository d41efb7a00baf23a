#!/usr/bin/env python3
"""Sums up gpu-check's tuning sweep (see scripts/tuning-variants.txt).

Each variant's bench (OUT/tune/NAME/) ran the default bifurcated build as
"baseline" and the variant as "bifurcated" at the same shape, so its speedup
column is default time / variant time (> 1: the variant is faster), and its
profiles give both builds' time per kernel op. It ends with the variants
faster than the default by more than 2% and one `--tune` line merging
them (the faster variant taking a key two of them set), to try next.

    scripts/tuning_summary.py --variants scripts/tuning-variants.txt --dir OUT/tune --out OUT/tune.md
"""
import argparse
import csv
import os
import re
import sys


# Kernels (summed over layers) shown per variant.
TOP = 10
# A variant "wins" when its step is faster than the default by more than this.
WIN = 0.02


def variants(path):
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, settings = line.split(None, 1)
            yield name, settings.strip()


def by_role(path):
    """Kernel time summed over layers: `k12_l0_attn_context_einsum1` and
    `k35_l1_attn_context_einsum1` are both `attn_context_einsum1`."""
    roles = {}
    if os.path.exists(path):
        for row in csv.DictReader(open(path)):
            role = re.sub(r"^k\d+_(l\d+_)?", "", row["kernel"])
            roles[role] = roles.get(role, 0.0) + float(row["ms"])
    return roles


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lines = [
        "# Tensor-core tuning sweep",
        "",
        "Each variant against the default build, side by side in one run (speedup > 1: the variant is faster).",
        "",
        "| variant | --tune | b | m_c | default ms | variant ms | speedup | logits max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ops_lines = []
    found = 0
    wins = []  # (speedup, name, settings) of the variants faster than the default
    for name, settings in variants(args.variants):
        d = os.path.join(args.dir, name)
        bench = os.path.join(d, "bench.csv")
        if not os.path.exists(bench):
            lines.append(f"| {name} | `{settings}` | | | | | not run | |")
            continue
        found += 1
        for row in csv.DictReader(open(bench)):
            try:
                speedup = float(row["speedup"])
            except (TypeError, ValueError):
                speedup = None
            if speedup is not None and speedup > 1.0 + WIN:
                wins.append((speedup, name, settings))
            lines.append(
                f"| {name} | `{settings}` | {row['b']} | {row['m_c']} | {row['baseline_ms'] or '-'} | "
                f"{row['bifurcated_ms'] or '-'} | {row['speedup'] or '-'} | {row['logits_max_abs_diff'] or '-'} |"
            )
        base = by_role(os.path.join(d, "profile-baseline.csv"))
        var = by_role(os.path.join(d, "profile-bifurcated.csv"))
        # The kernels that take the most time in either build.
        top = sorted(set(base) | set(var), key=lambda r: -max(base.get(r, 0.0), var.get(r, 0.0)))[:TOP]
        for role in top:
            b, v = base.get(role, 0.0), var.get(role, 0.0)
            ratio = f"{b / v:.2f}" if v > 0 else "-"
            ops_lines.append(f"| {name} | {role} | {b:.3f} | {v:.3f} | {ratio} |")
    if ops_lines:
        lines += [
            "",
            f"## Kernel time, summed over layers (profiles: default build, variant; the {TOP} largest)",
            "",
            "| variant | kernel | default ms | variant ms | speedup |",
            "|---|---|---:|---:|---:|",
        ] + ops_lines
    lines += ["", "## Suggested defaults", ""]
    if wins:
        # Merge the winners' settings, the faster variant taking a key two set.
        merged = {}
        for speedup, name, settings in sorted(wins, reverse=True):
            for item in settings.split(","):
                key, _, value = item.partition("=")
                merged.setdefault(key.strip(), (value.strip(), name))
        tune = ",".join(f"{k}={v}" for k, (v, _) in sorted(merged.items()))
        for speedup, name, settings in sorted(wins, reverse=True):
            lines.append(f"- `{name}` (`{settings}`) is {speedup:.2f}x the default")
        lines += [
            "",
            f"Try `bifurc compile --tune {tune}` against the default (each variant above was measured alone;",
            "check the logits column), then make the winners the defaults in src/lower/mma.rs (`Tuning::default`).",
        ]
    else:
        lines.append(f"No variant beat the default by more than {WIN:.0%}: keep the defaults.")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
