"""The leaderboard's and the budget curve's figures (matplotlib, Agg)."""

from __future__ import annotations

import math
import os

import numpy as np

from uadjax import atomic
from uadjax.benchmark.entries import KINDS_ORDER, Entry
from uadjax.benchmark.ranking import entry_of, results_of


def save_figures(root: str, entries: list[Entry], records: dict, board: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    present = [e for e in entries if records.get(e.key)]
    for kind in board["kinds"]:
        examples = {e.key: _examples(records[e.key][0], kind) for e in present
                    if not e.is_threshold}
        examples = {k: v for k, v in examples.items() if v is not None}
        if examples:
            first = next(iter(examples.values()))
            n = len(first["ids"])
            fig, axes = plt.subplots(len(examples) + 1, n, squeeze=False,
                                     figsize=(max(1.9 * n, 4.0), 1.9 * (len(examples) + 1)))
            for c in range(n):
                axes[0, c].imshow(np.rot90(first["image"][c]), cmap="gray", vmin=0, vmax=1)
                if first["seg"][c].any():
                    axes[0, c].contour(np.rot90(first["seg"][c]), levels=[0.5], colors="lime",
                                       linewidths=0.6)
                axes[0, c].set_title(f"{first['ids'][c]} z={first['slice'][c]}", fontsize=6)
            axes[0, 0].set_ylabel("input + truth", fontsize=7)
            for r, (key, ex) in enumerate(examples.items(), start=1):
                vmax = max(float(np.percentile(ex["score"], 99.5)), 1e-6)
                for c in range(min(n, len(ex["ids"]))):
                    axes[r, c].imshow(np.rot90(ex["score"][c]), cmap="inferno", vmin=0, vmax=vmax)
                axes[r, 0].set_ylabel(entry_of(entries, {"key": key}).name(), fontsize=7)
            for ax in axes.ravel():
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"anomaly maps, {kind}: the same test subjects across methods", fontsize=8)
            fig.tight_layout()
            written.append(_save(fig, os.path.join(root, f"maps_{kind}.png")))
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        for e in present:
            found = results_of(e, records[e.key][0]).kinds.get(kind)
            curve = found.pr_curve if found is not None else None
            if curve is None and e.is_threshold:
                continue
            if curve:
                ax.plot(curve["recall"], curve["precision"], label=e.name(), lw=1)
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1))
        ax.set_title(f"pooled in-brain PR curves: {kind} (first seed)", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(root, f"pr_{kind}.png")))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in board["rows"]:
        if "seconds_per_volume" not in r:
            continue
        dice = [r["kinds"][k]["dice"]["mean"] for k in board["kinds"]]
        dice = [d for d in dice if math.isfinite(d)]
        if dice:
            x, y = r["seconds_per_volume"]["mean"], 100 * float(np.mean(dice))
            ax.scatter(x, y, s=18)
            ax.annotate(r["label"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="inference time (s / volume, log)", ylabel="Dice, mean over lesion kinds (%)")
    ax.set_title("speed against accuracy", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, os.path.join(root, "speed_accuracy.png")))
    return written


def _examples(record: dict, kind: str):
    from uadjax.evaluation import EXAMPLES_FILE

    path = os.path.join(record["out_dir"], EXAMPLES_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if f"{kind}/ids" not in data:
            return None
        return {name: data[f"{kind}/{name}"] for name in ("ids", "slice", "image", "seg", "score")}


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def save_budget_figure(root: str, curve: dict) -> str:
    """budget_curve.png: Dice and AUPRC against steps, one line per method, per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS_ORDER if any(r["kind"] == k for r in curve["rows"])]
    fig, axes = plt.subplots(2, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 6.5),
                             squeeze=False)
    methods = sorted({r["method"] for r in curve["rows"]})
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(("dice", "auprc")):
            ax = axes[row, col]
            for method in methods:
                pts = sorted((r["steps"], 100 * r[metric]["mean"], 100 * r[metric]["std"])
                             for r in curve["rows"] if r["method"] == method
                             and r["kind"] == kind)
                if not pts:
                    continue
                steps, mean, std = (np.array(v) for v in zip(*pts))
                if (steps == 0).all():  # the baseline: no training, a level line
                    ax.axhline(mean[0], ls="--", lw=1, color="grey", label=method)
                    continue
                ax.errorbar(steps, mean, yerr=std, marker="o", capsize=2, label=method)
            ax.set_xscale("log")
            ax.set_title(f"{kind}: {'Dice' if metric == 'dice' else 'AUPRC'} (%)", fontsize=9)
            ax.set_xlabel("training steps per stage")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, os.path.join(root, "budget_curve.png"))
