"""Ranking: runs' results -> the leaderboard (mean ± std over seeds, permutation tests, paper
numbers), its Markdown and CSV, and the budget curve's table."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import time
from pathlib import Path

import numpy as np

from configs.benchmark import KIND_DATASETS, PAPER_ORDERINGS, PAPER_RESULTS, PAPER_SOURCE
from uadjax.benchmark.entries import KINDS_ORDER, Entry, Protocol, build_config, protocol_steps
from uadjax.benchmark.running import read_json
from uadjax.results import ORACLE, EvaluationResults, KindResults, MethodResults


def results_of(entry: Entry, record: dict) -> MethodResults:
    """The results of the method the entry's run evaluated."""
    evaluation: EvaluationResults = record["results"]
    return evaluation.of()


def _kinds(records: dict) -> list[str]:
    found = {kind for recs in records.values() for r in recs for kind in r["results"].of().kinds}
    return [k for k in KINDS_ORDER if k in found] + sorted(found - set(KINDS_ORDER))


def _mean_std(values) -> dict:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def _kind_metrics(kind: KindResults | None) -> dict:
    """The per-volume means of one run for one lesion kind (NaN where not computed)."""
    if kind is None:
        return dict.fromkeys(("dice", "auprc", "auroc", "dice_oracle", "healthy_fp_ml"),
                             math.nan)
    fp = kind.healthy_fp_volume_ml
    return {"dice": kind.mean("dice"), "auprc": kind.mean("ap"), "auroc": kind.mean("auroc"),
            "dice_oracle": kind.mean("dice", ORACLE),
            "healthy_fp_ml": fp["mean"] if fp else math.nan}


def network_evaluations_per_volume(entry: Entry, protocol: Protocol, record: dict) -> float:
    """Forward passes of the method's networks per scored volume (0 for the baseline)."""
    from uadjax.methods import get_method

    config = build_config(entry, protocol, 0)
    per_slice = sum(get_method(config.method).network_evaluations(config).values())
    timing = record["results"].timing
    if "slices_per_volume" in timing:  # over every volume, whichever process or run scored it
        return per_slice * timing["slices_per_volume"]
    return per_slice * timing["slices_scored"] / max(timing["volumes_scored"], 1)


def paired_permutation_p(a: np.ndarray, b: np.ndarray, *, resamples: int = 9999,
                         seed: int = 0) -> float:
    """Two-sided p of the mean paired difference a - b (scipy's permutation test, sign
    flips of the pairs)."""
    from scipy.stats import permutation_test

    if len(a) < 2 or np.allclose(a, b):
        return 1.0
    res = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                           permutation_type="samples", n_resamples=resamples,
                           alternative="two-sided", random_state=seed, vectorized=True)
    return float(res.pvalue)


def per_volume_dice(entry: Entry, records: list[dict], kind: str) -> dict[str, float]:
    """subject -> Dice at the validation-selected threshold, averaged over seeds."""
    by_subject: dict[str, list] = {}
    for record in records:
        name = record["results"].method
        for row in record["subjects"]:
            if row["method"] == name and row["kind"] == kind and row["threshold_source"] == "val":
                by_subject.setdefault(row["subject_id"], []).append(float(row["dice"]))
    return {s: float(np.mean(v)) for s, v in by_subject.items()}


def leaderboard(entries: list[Entry], protocol: Protocol, records: dict,
                datasets: dict | None = None) -> dict:
    """The aggregated leaderboard (JSON-ready): per entry, per kind the metrics' mean ± std
    over seeds, the permutation-test p against the best entry of the kind, the paper's
    number where one applies; reconstruction quality, times and network evaluations."""
    kinds = _kinds(records)
    rows = []
    for entry in entries:
        recs = records.get(entry.key, [])
        if not recs:
            rows.append({"key": entry.key, "label": entry.name(), "seeds": 0})
            continue
        row = {"key": entry.key, "label": entry.name(), "seeds": len(recs),
               "kinds": {}, "reconstruction": None}
        for kind in kinds:
            per_run = [_kind_metrics(results_of(entry, r).kinds.get(kind)) for r in recs]
            row["kinds"][kind] = {m: _mean_std([p[m] for p in per_run])
                                  for m in ("dice", "auprc", "auroc", "dice_oracle",
                                            "healthy_fp_ml")}
            paper = paper_number(entry, kind, protocol, datasets)
            if paper:
                row["kinds"][kind]["paper"] = paper
        recon = [r["results"].reconstruction for r in recs]
        if not entry.is_threshold and all(recon):
            row["reconstruction"] = {
                **{k: _mean_std([q["healthy"][k]["mean"] for q in recon])
                   for k in ("ssim", "psnr", "l1")},
                "l1_ratio": {kind: _mean_std([q["l1_ratio"].get(kind) for q in recon])
                             for kind in kinds}}
        if not entry.is_threshold:
            row["train_seconds"] = _mean_std([r["train_seconds"] for r in recs])
            row["train_seconds_estimated"] = any(r.get("train_seconds_estimated") for r in recs)
            row["seconds_per_volume"] = _mean_std(
                [r["results"].timing["seconds_per_volume"] for r in recs])
            row["network_evaluations_per_volume"] = network_evaluations_per_volume(
                entry, protocol, recs[0])
        rows.append(row)
    reads = {e.key: tuple(build_config(e, protocol, 0).data.modalities) for e in entries}
    for kind in kinds:
        scored = [(r, r["kinds"][kind]["dice"]["mean"]) for r in rows
                  if r.get("kinds") and math.isfinite(r["kinds"][kind]["dice"]["mean"])]
        if not scored:
            continue
        best_row = max(scored, key=lambda t: t[1])[0]
        for row, _ in scored:
            row["kinds"][kind]["best"] = row is best_row
            if row is best_row:
                continue
            p = paired_dice_difference(entries, records, rows, best_row["key"], row["key"],
                                       kind)["p"]
            if p is not None:  # None: no shared test subjects, nothing to pair
                row["kinds"][kind]["p_vs_best"] = p
        _compare_with_own_threshold(entries, reads, records, rows, kind)
    return {"protocol": dataclasses.asdict(protocol), "kinds": kinds, "rows": rows,
            "orderings": paper_orderings(entries, records, rows, kinds)}


def paired_dice_difference(entries, records, rows, a: str, b: str, kind: str) -> dict | None:
    """{'delta_dice': mean Dice of entry `a` minus `b`, 'p': paired permutation p of their
    seed-averaged per-volume Dice on the shared test subjects (None if none)}, or None when
    either has no finite Dice for `kind`."""
    by_key = {r["key"]: r for r in rows if r.get("kinds")}
    if a not in by_key or b not in by_key:
        return None
    mean_a, mean_b = (by_key[k]["kinds"][kind]["dice"]["mean"] for k in (a, b))
    if not (math.isfinite(mean_a) and math.isfinite(mean_b)):
        return None
    dice_a = per_volume_dice(entry_of(entries, by_key[a]), records[a], kind)
    dice_b = per_volume_dice(entry_of(entries, by_key[b]), records[b], kind)
    common = sorted(set(dice_a) & set(dice_b))
    p = paired_permutation_p(np.array([dice_a[s] for s in common]),
                             np.array([dice_b[s] for s in common])) if common else None
    return {"delta_dice": mean_a - mean_b, "p": p}


def paper_orderings(entries, records, rows, kinds) -> list[dict]:
    """configs/benchmark.py's PAPER_ORDERINGS whose two entries are listed: per kind the
    `paired_dice_difference` of better minus worse (positive: the paper's order holds)."""
    out = []
    for better, worse, source in PAPER_ORDERINGS:
        per_kind = {kind: paired_dice_difference(entries, records, rows, better, worse, kind)
                    for kind in kinds}
        if any(per_kind.values()):
            label = {r["key"]: r["label"] for r in rows}
            out.append({"better": better, "worse": worse, "source": source,
                        "claim": f"{label[better]} > {label[worse]}", "kinds": per_kind})
    return out


def _compare_with_own_threshold(entries, reads, records, rows, kind) -> None:
    """Adds `vs_threshold` to every method row of `kind`: the best (by mean Dice) listed
    intensity threshold among the modalities the method reads (its fair baseline), the mean
    Dice difference to it and the paired permutation p of per-volume Dice. `reads`: entry
    key -> the modalities its config reads."""
    thresholds = {}  # modality -> threshold row
    for row in rows:
        entry = entry_of(entries, row)
        if entry.is_threshold and row.get("kinds"):
            for modality in reads[entry.key]:
                thresholds[modality] = row
    for row in rows:
        entry = entry_of(entries, row)
        if entry.is_threshold or not row.get("kinds"):
            continue
        dice = row["kinds"][kind]["dice"]["mean"]
        own = [(m, thresholds[m]) for m in reads[entry.key] if m in thresholds
               and math.isfinite(thresholds[m]["kinds"][kind]["dice"]["mean"])]
        if not own or not math.isfinite(dice):
            continue
        modality, base = max(own, key=lambda t: t[1]["kinds"][kind]["dice"]["mean"])
        row["kinds"][kind]["vs_threshold"] = {
            "key": base["key"], "label": base["label"], "modality": modality,
            **paired_dice_difference(entries, records, rows, row["key"], base["key"], kind)}


def entry_of(entries, row) -> Entry:
    return next(e for e in entries if e.key == row["key"])


def paper_number(entry: Entry, kind: str, protocol: Protocol, datasets: dict | None):
    """{'dice', 'auprc', 'source'} when a seed paper reports `entry` on this kind's dataset
    under the protocol reproduced here (paper size, the dataset's own source), else None."""
    if protocol.size != "paper" or not datasets or entry.key not in PAPER_RESULTS:
        return None
    for dataset in KIND_DATASETS.get(kind, ()):
        for modality in datasets.get("modalities", ()):
            if dataset in datasets.get("kinds", {}).get(kind, ()):
                found = PAPER_RESULTS[entry.key].get((dataset, modality))
                if found:
                    return {"dice": found[0], "auprc": found[1], "source": PAPER_SOURCE}
    return None


def dataset_sources(dataset_dir: str) -> dict | None:
    """{'modalities': [...], 'kinds': {kind: [source dataset, ...]}} of a prepared dataset
    folder's test subjects (None for the phantom)."""
    if not dataset_dir:
        return None
    manifest = read_json(os.path.join(dataset_dir, "manifest.json")) or {}
    kinds: dict[str, set] = {}
    for subject in manifest.get("subjects", []):
        if subject.get("split") == "test_lesion":
            kinds.setdefault(subject.get("kind"), set()).add(subject.get("source"))
    return {"modalities": manifest.get("modalities", []),
            "kinds": {k: sorted(v) for k, v in kinds.items()}}


def _cell(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if not stat or not stat.get("n"):
        return "-"
    mean = scale * stat["mean"]
    if stat["n"] == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _p_cell(kind_stats: dict) -> str:
    if kind_stats.get("best"):
        return "best"
    p = kind_stats.get("p_vs_best")
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def _difference_cell(difference: dict | None, what: str = "") -> str:
    """'+12.3 (p 0.004)': Dice points of a paired difference and its p."""
    if not difference:
        return "-"
    p = difference["p"]
    p_text = "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")
    return f"{100 * difference['delta_dice']:+.1f}{what} (p {p_text})"


def _threshold_cell(versus: dict | None) -> str:
    """'+12.3 T2 (p 0.004)': Dice points above the method's own-modality threshold."""
    return _difference_cell(versus, f" {versus['modality'].upper()}" if versus else "")


def to_markdown(board: dict) -> str:
    """Three tables: detection per lesion kind; reconstruction quality; cost."""
    kinds, rows = board["kinds"], [r for r in board["rows"] if r.get("seeds")]
    has_paper = any("paper" in r["kinds"][k] for r in rows for k in kinds)
    head = ["method", "seeds"]
    for kind in kinds:
        head += [f"{kind} Dice", "p", "vs threshold", "AUPRC", "AUROC", "Dice (oracle)",
                 "healthy FP ml"]
        head += ["paper Dice / AUPRC"] if has_paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r["seeds"])]
        for kind in kinds:
            k = r["kinds"][kind]
            dice = _cell(k["dice"])
            cells += [f"**{dice}**" if k.get("best") else dice, _p_cell(k),
                      _threshold_cell(k.get("vs_threshold")), _cell(k["auprc"]),
                      _cell(k["auroc"]), _cell(k["dice_oracle"]),
                      _cell(k["healthy_fp_ml"], scale=1.0)]
            if has_paper:
                paper = k.get("paper")
                cells.append(f"{paper['dice']:.1f} / {paper['auprc']:.1f}" if paper else "-")
        lines.append("| " + " | ".join(cells) + " |")
    out = ["### Detection", "\n".join(lines)]
    if board.get("orderings"):
        head = ["the paper's ordering", "where"] + [f"{kind} Dice difference" for kind in kinds]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for o in board["orderings"]:
            lines.append("| " + " | ".join([o["claim"], o["source"]] + [
                _difference_cell(o["kinds"].get(kind)) for kind in kinds]) + " |")
        out += ["### The papers' orderings at this budget", "\n".join(lines)]
    recon_rows = [r for r in rows if r.get("reconstruction")]
    if recon_rows:
        head = ["method", "SSIM (%)", "PSNR (dB)", "L1 (e-3)"] + [f"L1 ratio {k}" for k in kinds]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in recon_rows:
            q = r["reconstruction"]
            lines.append("| " + " | ".join(
                [r["label"], _cell(q["ssim"]), _cell(q["psnr"], 1.0, 2), _cell(q["l1"], 1000.0, 2)]
                + [_cell(q["l1_ratio"][k], 1.0, 2) for k in kinds]) + " |")
        out += ["### Reconstruction of healthy test subjects", "\n".join(lines)]
    head = ["method", "training (min)", "inference (s / volume)", "network evaluations / volume"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "seconds_per_volume" not in r:
            continue
        approx = "~" if r.get("train_seconds_estimated") and r["train_seconds"]["n"] else ""
        lines.append(f"| {r['label']} | {approx}{_cell(r['train_seconds'], 1 / 60)} | "
                     f"{_cell(r['seconds_per_volume'], 1.0, 2)} | "
                     f"{r['network_evaluations_per_volume']:.0f} |")
    out += ["### Cost", "\n".join(lines)]
    return "\n\n".join(out)


def to_csv(board: dict) -> str:
    """Long format: method, kind ('' for per-method figures), metric, mean, std, n."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "kind", "metric", "mean", "std", "n"])
    for r in board["rows"]:
        if not r.get("seeds"):
            continue
        for kind, stats in r["kinds"].items():
            for metric in ("dice", "auprc", "auroc", "dice_oracle", "healthy_fp_ml"):
                s = stats[metric]
                writer.writerow([r["label"], kind, metric, s["mean"], s["std"], s["n"]])
            if "p_vs_best" in stats:
                writer.writerow([r["label"], kind, "p_vs_best_dice", stats["p_vs_best"], "", ""])
            if "vs_threshold" in stats:
                versus = stats["vs_threshold"]
                writer.writerow([r["label"], kind, f"dice_minus_{versus['modality']}_threshold",
                                 versus["delta_dice"], "", ""])
                writer.writerow([r["label"], kind, f"p_vs_{versus['modality']}_threshold_dice",
                                 versus["p"], "", ""])
        for metric in ("train_seconds", "seconds_per_volume"):
            if metric in r:
                s = r[metric]
                writer.writerow([r["label"], "", metric, s["mean"], s["std"], s["n"]])
        if "network_evaluations_per_volume" in r:
            writer.writerow([r["label"], "", "network_evaluations_per_volume",
                             r["network_evaluations_per_volume"], "", ""])
        if r.get("reconstruction"):
            for metric in ("ssim", "psnr", "l1"):
                s = r["reconstruction"][metric]
                writer.writerow([r["label"], "", metric, s["mean"], s["std"], s["n"]])
            for kind, s in r["reconstruction"]["l1_ratio"].items():
                writer.writerow([r["label"], kind, "l1_ratio", s["mean"], s["std"], s["n"]])
    return buf.getvalue()


def machine() -> dict:
    """Where the leaderboard was computed: CPU model and count, accelerators, versions."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "devices": sorted({str(d.device_kind) for d in
                                                                   jax.devices()}),
            "platform": jax.default_backend(), "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def provenance(board: dict) -> str:
    m = board.get("machine", {})
    devices = ", ".join(m.get("devices", []))
    generator = board.get("phantom_generator")
    data = (f" on the phantom of generator {generator} (docs/phantom.md)"
            if generator is not None else "")
    return (f"`{board.get('command', '')}`: {m.get('cpus')} cores of {m.get('cpu')}, JAX "
            f"{m.get('jax')} on its {m.get('platform')} backend ({devices}), {m.get('date')}"
            f"{data}.")


LEGEND = (
    "Per-volume means, then mean ± std over seeds, in percent (FP in ml, PSNR in dB). Dice "
    "and AUPRC at the threshold selected on the lesion-validation volumes of each kind; "
    "`Dice (oracle)` at the best threshold on the test volumes themselves (not a fair "
    "score, for comparison with papers that report it); healthy FP = false-positive volume "
    "on healthy test subjects at the validation threshold. p: paired permutation test of "
    "per-volume Dice (seed-averaged) against the best method of the lesion kind (bold). "
    "vs threshold: Dice points above the best listed intensity threshold of the modalities "
    "the method reads (its fair baseline), with the same paired test against it; the "
    "papers' orderings table: better minus worse, so a positive difference is the paper's "
    "order. "
    "Reconstruction: SSIM, PSNR, L1 inside the brain on healthy test subjects; L1 ratio = "
    "L1 on the kind's test subjects / L1 on healthy ones (cDDPM Table 2). Inference time: "
    "wall time of scoring per volume (data loading included, compilation not); training "
    "time marked ~ is estimated from the training logs of a run trained before the "
    "benchmark (steps x batch / logged slices per second).")


def budget_curve(entries: list[Entry], by_budget: dict) -> dict:
    """{'rows': one per (method, budget, lesion kind): steps, seeds and the mean ± std over
    seeds of per-volume Dice and AUPRC at the validation-selected threshold}."""
    rows = []
    for protocol, records in by_budget.items():
        kinds = _kinds(records)
        for entry in entries:
            recs = records.get(entry.key, [])
            for kind in kinds:
                metrics = [_kind_metrics(results_of(entry, r).kinds[kind]) for r in recs
                           if kind in results_of(entry, r).kinds]
                if not metrics:
                    continue
                rows.append({"method": entry.name(), "budget": protocol.budget or "full",
                             "steps": protocol_steps(entry, protocol), "kind": kind,
                             "seeds": len(metrics),
                             "dice": _mean_std(m["dice"] for m in metrics),
                             "auprc": _mean_std(m["auprc"] for m in metrics)})
    return {"rows": rows}


def budget_curve_markdown(curve: dict) -> str:
    lines = ["| method | lesion | budget | steps per stage | seeds | Dice | AUPRC |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(curve["rows"], key=lambda r: (r["method"], r["kind"], r["steps"])):
        lines.append(f"| {r['method']} | {r['kind']} | {r['budget']} | {r['steps']} | "
                     f"{r['seeds']} | {_cell(r['dice'])} | {_cell(r['auprc'])} |")
    return "\n".join(lines)
