#!/usr/bin/env python
"""Plots of a bench_attention.py JSON result: median time per implementation, one panel per
(shape, index list), modes on the x axis (log scale), and peak extra memory likewise; of a
bench_pipeline.py result: memory against frames.

    python benchmarks/plot.py benchmarks/results/attention_cpu.json [--out DIR]
    python benchmarks/plot.py benchmarks/results/pipeline_cpu.json [--out DIR]

Writes <DIR>/<json stem>_time.png and <json stem>_memory.png (DIR defaults to the JSON's folder).
Needs matplotlib; without it, prints a message and exits 0 (nothing else depends on the plots).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def family(impl):
    """One bar slot and colour per implementation across modes: 'ours[cpu]' (plain) and 'ours[cpu] qk'
    (replace, blend) share one; 'ours[cpu] probs' has its own; ' x2+lerp' is dropped."""
    return impl.replace(" x2+lerp", "").replace(" qk", "")


def plot_pipeline(result, out_dir, stem, plt):
    """Peak GPU memory, peak host RSS and the official store (computed) against frames, log-log;
    one line per chunk setting. Failed configurations show only their computed store."""
    records = result["records"]
    fig, ax = plt.subplots(figsize=(7, 5))
    chunks = list(dict.fromkeys(str(r.get("chunk_size")) for r in records))
    for j, chunk in enumerate(chunks):
        rows = sorted((r for r in records if str(r.get("chunk_size")) == chunk and r.get("status") == "ok"),
                      key=lambda r: r["frames"])
        label = "unchunked" if chunk == "None" else f"chunk {chunk}"
        for key, style, what in (("peak_gpu_allocated_bytes", "-o", "peak GPU"), ("peak_rss_bytes", "--s", "peak RSS")):
            points = [(r["frames"], r[key] / 1e9) for r in rows if r.get(key)]
            if points:
                ax.plot(*zip(*points), style, color=f"C{j}", label=f"{what}, {label}")
    official = sorted({(r["frames"], r["official_store_bytes_50_steps"]) for r in records})
    ax.plot([f for f, _ in official], [b / 1e9 for _, b in official], ":^", color="gray",
            label="official store, 50 steps (computed)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("GB")
    env = result.get("environment", {})
    first = records[0]
    ax.set_title(f"{env.get('device', '?')} | {first.get('model')} {first.get('size')}px {first.get('dtype')} | "
                 f"store {first.get('store')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}_memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot.py: wrote {path}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="plot a bench_attention.py or bench_pipeline.py JSON result")
    p.add_argument("json", help="result file written by benchmarks/bench_attention.py or bench_pipeline.py")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the JSON's folder)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed; skipping the plots (the JSON and the printed table "
              "hold every number)")
        return 0

    with open(args.json) as f:
        result = json.load(f)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.json))[0]
    if result["records"] and "official_store_bytes_50_steps" in result["records"][0]:  # bench_pipeline.py
        return plot_pipeline(result, out_dir, stem, plt)
    records = [r for r in result["records"] if r.get("status") == "ok"]
    if not records:
        print(f"plot.py: no successful records in {args.json}")
        return 1
    panels = sorted({(r["latent"], r["index_name"]) for r in records}, key=lambda k: (-k[0], k[1]))
    modes = [m for m in ("plain", "replace", "blend0", "blend20", "blend50") if any(r["mode"] == m for r in records)]
    impls = list(dict.fromkeys(family(r["impl"]) for r in records))
    env = result.get("environment", {})
    title = (f"{env.get('device', '?')} | torch {env.get('torch')} | {result['config'].get('dtype')} | "
             f"B={result['config'].get('frames')} H={result['config'].get('heads')} | loadavg {env.get('loadavg_start')}")

    written = []
    for metric, label, scale, fname in (("median_ms", "median time (ms)", 1.0, "time"),
                                        ("peak_extra_bytes", "peak extra memory (MiB)", 1 / 2**20, "memory")):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
        for ax, (latent, index_name) in zip(axes[0], panels):
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, mode in enumerate(modes):
                    for r in records:
                        if (r["latent"], r["index_name"], r["mode"]) == (latent, index_name, mode) and \
                                family(r["impl"]) == impl:
                            xs.append(i + (j - len(impls) / 2) * width)
                            ys.append(max(r[metric] * scale, 1e-6))
                if xs:
                    ax.bar(xs, ys, width=width, label=impl, color=f"C{j % 10}")
            ax.set_yscale("log")
            ax.set_xticks(range(len(modes)))
            ax.set_xticklabels(modes)
            ax.set_title(f"{latent}x{latent}, index {index_name}")
            ax.set_ylabel(label)
        legend = {}
        for ax in axes[0]:
            for handle, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, handle)
        labels = [i for i in impls if i in legend]
        handles = [legend[i] for i in labels]
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        path = os.path.join(out_dir, f"{stem}_{fname}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    print("plot.py: wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
