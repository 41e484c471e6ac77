#!/usr/bin/env python3
"""Plot omniq runs: per-block loss curves and a perplexity table, as PNG.

    python3 tools/plot_run.py runs/quickstart              # a sweep dir (every */run.h5)
    python3 tools/plot_run.py runs/quickstart/W3A16-omniquant  # one run dir (or its run.h5)
    python3 tools/plot_run.py runs/quickstart -o plots/

Writes, into the output folder (default: the given dir):
  <point>_loss.png   training loss per epoch, one curve per block (final MSE as a dot)
  final_loss.png     final block MSE vs block index, one line per point
  ppl.png            a table: point, setting, status, perplexity per evaluated text

Needs h5py and matplotlib (pip install h5py matplotlib). Layout: docs/hdf5-layout.md.
"""
import argparse
import os
import sys

import h5py
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def as_str(v):
    """h5py gives str for variable-length UTF-8 strings, bytes for fixed-length ones."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def find_runs(path):
    """(name, run.h5 path) for a run.h5, a run dir, or a sweep dir of run dirs."""
    if os.path.isfile(path):
        return [(os.path.basename(os.path.dirname(os.path.abspath(path))), path)]
    own = os.path.join(path, "run.h5")
    if os.path.isfile(own):
        return [(os.path.basename(os.path.abspath(path)), own)]
    runs = []
    for name in sorted(os.listdir(path)):
        h5 = os.path.join(path, name, "run.h5")
        if os.path.isfile(h5):
            runs.append((name, h5))
    return runs


def read_run(h5_path):
    """Everything the plots need, read eagerly so the file is closed right away."""
    run = {"blocks": [], "ppl": {}, "status": "?", "setting": "", "method": ""}
    with h5py.File(h5_path, "r") as f:
        run["status"] = as_str(f.attrs.get("status", "?"))
        run["setting"] = as_str(f.attrs.get("quantization.setting", ""))
        run["method"] = as_str(f.attrs.get("quantization.method", ""))
        if "blocks" in f:
            for name in sorted(f["blocks"]):
                g = f["blocks"][name]
                run["blocks"].append({
                    "block": int(name.split("_")[-1]),
                    "epoch_loss": g["epoch_loss"][:] if "epoch_loss" in g else [],
                    "final_loss": float(g.attrs.get("final_loss", float("nan"))),
                })
        if "eval" in f:
            for name, g in f["eval"].items():
                label = os.path.basename(as_str(g.attrs.get("source", name))) or name
                run["ppl"][label] = float(g.attrs.get("ppl", float("nan")))
    return run


def plot_loss_curves(name, run, out_dir):
    blocks = [b for b in run["blocks"] if len(b["epoch_loss"]) > 0]
    if not blocks:
        return None  # RTN: no training, nothing to draw per epoch
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b in blocks:
        epochs = range(1, len(b["epoch_loss"]) + 1)
        (line,) = ax.plot(epochs, b["epoch_loss"], label=f"block {b['block']}")
        ax.plot([len(b["epoch_loss"])], [b["final_loss"]], "o", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (dot: final MSE of the fused block)")
    ax.set_title(f"{name}: {run['method']} {run['setting']} ({run['status']})")
    if len(blocks) <= 16:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_final_loss(runs, out_dir):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name, run in runs:
        if run["blocks"]:
            ax.plot([b["block"] for b in run["blocks"]], [b["final_loss"] for b in run["blocks"]], marker=".", label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("final MSE vs fp block")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, "final_loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ppl_table(runs, out_dir):
    labels = []
    for _, run in runs:
        for k in run["ppl"]:
            if k not in labels:
                labels.append(k)
    header = ["point", "method", "setting", "status"] + [f"ppl {k}" for k in labels]
    rows = []
    for name, run in runs:
        ppl = [run["ppl"].get(k) for k in labels]
        rows.append([name, run["method"], run["setting"], run["status"]] +
                    ["-" if v is None or v != v else f"{v:.3f}" for v in ppl])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(header)), 0.5 + 0.35 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
    fig.tight_layout()
    path = os.path.join(out_dir, "ppl.png")
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a sweep dir, a run dir, or a run.h5")
    p.add_argument("-o", "--out", help="output folder for the PNGs (default: the run/sweep dir)")
    a = p.parse_args()
    found = find_runs(a.path)
    if not found:
        sys.exit(f"plot_run: no run.h5 under {a.path}")
    out_dir = a.out or (a.path if os.path.isdir(a.path) else os.path.dirname(os.path.abspath(a.path)))
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for name, h5 in found:
        try:
            runs.append((name, read_run(h5)))
        except OSError as e:  # e.g. a file a crashed run left unreadable
            print(f"plot_run: skipping {h5}: {e}", file=sys.stderr)
    written = [plot_loss_curves(name, run, out_dir) for name, run in runs]
    written += [plot_final_loss(runs, out_dir), plot_ppl_table(runs, out_dir)]
    for w in written:
        if w:
            print(w)


if __name__ == "__main__":
    main()
