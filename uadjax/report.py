"""report.md with the results table and figures (examples and precision-recall curves)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve

from uadjax import atomic
from uadjax.inference.scoring import ScoredVolume


def lesion_slice(seg: np.ndarray) -> int:
    """Axial index with the largest lesion area (the middle slice if there is none)."""
    areas = seg.reshape(seg.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.max() > 0 else seg.shape[0] // 2


def save_examples_figure(path: str, volumes: list[ScoredVolume], scores: dict[str, np.ndarray],
                         threshold: float, *, title: str) -> None:
    """One row per subject: input, reconstruction, anomaly map, prediction, ground truth."""
    cols = ["input", "reconstruction", "anomaly map", f"map > {threshold:.3g}", "ground truth"]
    fig, axes = plt.subplots(len(volumes), len(cols), figsize=(2.2 * len(cols),
                                                                2.2 * len(volumes)),
                             squeeze=False)
    for r, vol in enumerate(volumes):
        k = lesion_slice(vol.seg)
        score = scores[vol.subject_id][k]
        panels = [vol.image[k, ..., 0],
                  None if vol.reconstruction is None else vol.reconstruction[k, ..., 0],
                  score, score > threshold, vol.seg[k]]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            if panel is None:
                continue
            vmax = max(float(np.max(score)), 1e-6) if c == 2 else None
            cmap = "inferno" if c == 2 else "gray"
            ax.imshow(np.rot90(panel), cmap=cmap, vmin=0, vmax=vmax if c == 2 else
                      (1 if c in (0, 1, 3, 4) else None), interpolation="nearest")
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 0].text(0, -2, f"{vol.subject_id} z={k}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_pr_figure(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], *,
                   title: str) -> None:
    """curves: label -> (pooled scores, pooled labels) subsampled to a tractable size."""
    fig, ax = plt.subplots(figsize=(4, 4))
    for label, (scores, labels) in curves.items():
        if labels.any():
            prec, rec, _ = precision_recall_curve(labels, scores)
            ax.plot(rec, prec, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(path: str, *, title: str, table: str, sections: list[str]) -> None:
    atomic.write_text(path, "\n\n".join([f"# {title}", table, *sections]) + "\n")
