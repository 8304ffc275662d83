"""The phantom against the real datasets: threshold baselines, lesions and anatomy.

    python -m benchmarks.phantom_calibration [--variant default] [--seed 0]
        [--resolutions native,3] [--modalities flair,t2] [--json out.json]

Generates (or reuses, cached in `.cache/phantom`) the phantom variant, then prints
  1. the intensity-threshold baseline per lesion kind, modality and resolution, on the
     project's own evaluation path (`preprocess_files` -> `protocol.evaluate_scores`, the
     code `./launch.sh run --config=configs/threshold.py:cpu,flair` runs): best-possible
     pooled Dice (threshold chosen on the test volumes), pooled AUPRC, and the Dice at the
     threshold selected on the lesion-validation subjects, next to the published FLAIR
     figures (Meissen et al., BrainLes 2021, Table 2) and the calibration targets;
  2. the lesion volumes and counts per kind (test and validation lesion subjects) against
     the published distributions of docs/phantom.md;
  3. each lesion compartment's signal over WM and GM in T1, T2, PD and FLAIR (the signal
     equations with the nominal tissue parameters) beside the ICBM template's own healthy
     contrast, and, measured on the images, where the median lesion voxel sits among the
     same subject's healthy brain voxels;
  4. the healthy anatomy of the test subjects (CSF fraction, ventricle volume, GM/WM edge
     width, cortical thickness) against published morphometry and the template itself.

Resolutions: 3 = the CPU configs' grid (configs/data.py:cpu, 64x64 at 3 mm, the cpu
evaluation's post-processing: eroded mask, 3D median filter of 5, components >= 8 voxels);
native = the phantom's own grid (2 mm, or 1 mm for `--variant 1mm`), no resampling, the
whole brain, Meissen et al.'s protocol: no median filter, one erosion of the mask,
components of at least 64 mm3.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from scipy import ndimage

from configs import common as common_configs
from configs import data as data_configs
from configs import phantom as phantom_configs
from uadjax import protocol
from uadjax.data import (
    nifti,
    phantom,
    phantom_anatomy,
    phantom_lesions,
    phantom_regions,
    phantom_signal,
    preprocess,
    schema,
)
from uadjax.data.phantom_reference import (
    ANATOMY_ANCHORS,
    ANCHORS,
    FISCHL_2000,
    ICBM_CONTRAST,
    LOCATION_ANCHORS,
    THRESHOLD_TARGETS,
)
from uadjax.data.phantom_template import load_template
from uadjax.inference.scoring import ScoredVolume

SPLITS = (schema.VAL_LESION, schema.TEST_LESION, schema.VAL_HEALTHY, schema.TEST_HEALTHY)


def dataset(variant: str, seed: int, root: str = ".cache/phantom") -> pathlib.Path:
    """The phantom folder of `variant` (generated unless cached with the same config)."""
    out = pathlib.Path(root) / f"{variant}-seed{seed}"
    config = phantom_configs.get_config(variant)
    phantom.generate_dataset(out, config, seed=seed,
                             overwrite=phantom.is_stale_cache(out, config, seed))
    return out


def grid_configs(resolution: str, modality: str, native_mm: float):
    """(data config, eval config) of one evaluation grid ('3' or 'native')."""
    if resolution == "3":
        return data_configs.get_config(f"cpu:{modality}"), common_configs.base_config("cpu").eval
    data = data_configs.get_config(f"paper:{modality}")
    data.target_spacing = None  # native grid
    data.image_size = (256, 256) if native_mm < 1.5 else (96, 112)  # the whole brain
    data.num_slices = None
    ecfg = common_configs.base_config("paper").eval
    ecfg.median_size = 0
    ecfg.erode_iterations = 1
    ecfg.min_component_size = int(round(64.0 / native_mm**3))
    return data, ecfg


def threshold_results(folder: pathlib.Path, manifest: dict, resolution: str, modality: str):
    """evaluate_scores' results of the intensity threshold on one modality and grid."""
    data, ecfg = grid_configs(resolution, modality, manifest["voxel_size_mm"])
    split_volumes: dict = {split: {} for split in SPLITS}
    spacing = None
    for entry in manifest["subjects"]:
        if entry["split"] not in split_volumes:
            continue
        files = nifti.subject_files(folder, entry, data.modalities)
        vol = preprocess.preprocess_files(files, data)
        spacing = tuple(float(s) for s in vol.geometry.spacing_after)[::-1]
        split_volumes[entry["split"]][entry["id"]] = ScoredVolume(
            subject_id=entry["id"], kind=entry["kind"], score=vol.images[..., 0],
            image=vol.images, brain_mask=vol.brain_mask, seg=vol.seg.astype(bool))
    results, _ = protocol.evaluate_scores(split_volumes, ecfg, spacing=spacing)
    return results


def print_threshold_table(rows: list[dict]) -> None:
    print("\n## Intensity threshold (pooled over the test volumes of each kind)\n")
    print("| kind | modality | grid | Dice, best possible | AUPRC | Dice, val threshold "
          "| per-volume Dice | published (FLAIR) | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        anchor = THRESHOLD_TARGETS.get((r["kind"], r["modality"]), {})
        target = anchor.get("target", {}).get(round(r["grid_mm"]))
        target = f"{target[0]:.2f}-{target[1]:.2f}" if target else "-"
        published = f"{anchor['published']:.3f} ({anchor['dataset']})" if anchor else "-"
        print(f"| {r['kind']} | {r['modality']} | {r['grid_mm']:g} mm | {r['oracle_dice']:.3f} | "
              f"{r['ap']:.3f} | {r['val_dice']:.3f} | {r['per_volume_dice']:.3f} | "
              f"{published} | {target} |")


def lesion_statistics(folder: pathlib.Path, manifest: dict) -> dict:
    """Per kind: lesion volumes (ml), MS lesion counts, and image contrast of the lesions."""
    voxel_ml = manifest["voxel_size_mm"] ** 3 / 1000.0
    stats: dict = {}
    for entry in manifest["subjects"]:
        if entry["split"] not in (schema.VAL_LESION, schema.TEST_LESION):
            continue
        kind = entry["kind"]
        s = stats.setdefault(kind, {"volume_ml": [], "count": [], "lesion_ml": [],
                                    "severity": [], "core_share": [],
                                    "percentile": {m: [] for m in phantom_signal.MODALITIES},
                                    "ratio": {m: [] for m in phantom_signal.MODALITIES}})
        seg = nifti.load_label(folder / entry["files"]["seg"]).data > 0
        brain = nifti.load_label(folder / entry["files"]["brainmask"]).data > 0
        labels, count = ndimage.label(seg)
        sizes = ndimage.sum_labels(seg, labels, np.arange(1, count + 1)) * voxel_ml
        s["volume_ml"].append(float(seg.sum()) * voxel_ml)
        info = entry.get("lesion", {})
        s["severity"].extend(info.get("severity", []))
        if "core_share" in info:
            s["core_share"].append(info["core_share"])
        s["count"].append(int(count))
        s.setdefault("sites", {})
        for site, n in (info.get("sites") or {info.get("site", "?"): 1}).items():
            s["sites"][site] = s["sites"].get(site, 0) + n
        s["lesion_ml"].extend(float(v) for v in sizes)
        healthy = brain & ~ndimage.binary_dilation(seg, iterations=2)
        for modality in phantom_signal.MODALITIES:
            image = nifti.load_nifti(folder / entry["files"][modality]).data
            lesion_median = float(np.median(image[seg]))
            reference = image[healthy]
            s["percentile"][modality].append(
                100.0 * float(np.mean(reference < lesion_median)))
            s["ratio"][modality].append(lesion_median / float(np.median(reference)))
    return stats


def _quartiles(values) -> str:
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return f"{q[2]:.1f} [{q[1]:.1f}-{q[3]:.1f}] ({q[0]:.1f}-{q[4]:.1f})"


def print_lesion_table(stats: dict) -> None:
    print("\n## Lesion volumes and counts (val + test lesion subjects), "
          "median [IQR] (range)\n")
    print("| kind | n | volume per subject, ml | published | lesions per subject "
          "| published | single-lesion volume, ml |")
    print("|---|---|---|---|---|---|---|")
    for kind, s in stats.items():
        a = ANCHORS[kind]
        print(f"| {kind} | {len(s['volume_ml'])} | {_quartiles(s['volume_ml'])} | "
              f"{a['volume_ml_text']} | {_quartiles(s['count'])} | {a.get('count_text', '-')} | "
              f"{_quartiles(s['lesion_ml'])} |")
    print("\n| kind | lesions | severity, median (range) | subtle lesions (severity < 0.7) "
          "| tumour core / whole tumour, median (range) |")
    print("|---|---|---|---|---|")
    for kind, s in stats.items():
        sev = np.asarray(s["severity"], float)
        if sev.size == 0:
            continue
        core = (f"{np.median(s['core_share']):.2f} ({min(s['core_share']):.2f}-"
                f"{max(s['core_share']):.2f}); BraTS: {ANCHORS['tumour']['core_share_text']}"
                if s["core_share"] else "-")
        print(f"| {kind} | {sev.size} | {np.median(sev):.2f} ({sev.min():.2f}-{sev.max():.2f}) "
              f"| {100 * np.mean(sev < 0.7):.0f} % | {core} |")
    print("\n## Image contrast: percentile of the median lesion voxel among the subject's "
          "healthy brain voxels, median (range)\n")
    print("| kind | " + " | ".join(phantom_signal.MODALITIES) + " |")
    print("|---|" + "---|" * len(phantom_signal.MODALITIES))
    for kind, s in stats.items():
        cells = [f"{np.median(s['percentile'][m]):.0f} ({np.min(s['percentile'][m]):.0f}-"
                 f"{np.max(s['percentile'][m]):.0f})" for m in phantom_signal.MODALITIES]
        print(f"| {kind} | " + " | ".join(cells) + " |")


def print_location_table(stats: dict, config) -> None:
    """Drawn lesion sites (val + test subjects) against the configured published prior."""
    print("\n## Lesion location: share of lesions per site, phantom (n) against the prior\n")
    print("| kind | site | phantom | prior | source |")
    print("|---|---|---|---|---|")
    for kind, s in stats.items():
        anchor = LOCATION_ANCHORS[kind]
        names, prior = phantom_lesions.normalised(config.lesions[kind][anchor["config"]])
        total = max(sum(s.get("sites", {}).values()), 1)
        for i, (name, p) in enumerate(zip(names, prior)):
            n = s.get("sites", {}).get(name, 0)
            source = f"{anchor['text']} ({anchor['status']})" if i == 0 else ""
            print(f"| {kind} | {name} | {100 * n / total:.0f} % ({n}) | {100 * p:.1f} % | "
                  f"{source} |")


def print_compartment_table(config) -> None:
    """Signal of each compartment over WM and GM (nominal parameters, the config's protocol)."""
    signals = phantom_signal.compartment_signals(phantom_signal.TISSUES, config.sequences)
    print("\n## Compartment signal / WM signal (and / GM), nominal tissue parameters\n")
    print("| compartment | T1 ms | T2 ms | PD | " + " | ".join(
        f"{m} /WM (/GM)" for m in phantom_signal.MODALITIES) + " |")
    print("|---|---|---|---|" + "---|" * len(phantom_signal.MODALITIES))
    for name, p in phantom_signal.TISSUES.items():
        cells = [f"{signals[m][name] / signals[m]['wm']:.2f} "
                 f"({signals[m][name] / signals[m]['gm']:.2f})" for m in phantom_signal.MODALITIES]
        print(f"| {name} | {p.t1:.0f} | {p.t2:.0f} | {p.pd:.2f} | " + " | ".join(cells) + " |")
    for name in ("gm", "csf"):
        cells = [f"{ICBM_CONTRAST[m][name]:.2f}" if m in ICBM_CONTRAST else "-"
                 for m in phantom_signal.MODALITIES]
        print(f"| {name}, ICBM 2009c template (measured) | | | | " + " | ".join(cells) + " |")


def anatomy_statistics(variant: str, seed: int, manifest: dict) -> dict:
    """Morphometry of the healthy test subjects (regenerated in memory) and the template."""
    config = phantom_configs.get_config(variant)
    template = load_template(config.get("template"))
    voxel_mm = template.voxel_size_mm
    rows = {"template": phantom_anatomy.morphometry(
        {"gm": template.gm, "wm": template.wm, "csf": template.csf}, template.depth,
        template.ventricle_distance, template.brainmask, voxel_mm)}
    for index, entry in enumerate(manifest["subjects"]):
        if entry["split"] != schema.TEST_HEALTHY:
            continue
        subject = phantom.make_subject(template, config, index, entry["kind"], seed,
                                       with_anatomy=True)
        a = subject["anatomy"]
        rows[entry["id"]] = phantom_anatomy.morphometry(
            a, a["depth"], a["ventricle_distance"], subject["brainmask"] > 0, voxel_mm)
    return {"voxel_mm": voxel_mm, "rows": rows}


def print_anatomy_table(anatomy: dict) -> None:
    rows = anatomy["rows"]
    subjects = [r for name, r in rows.items() if name != "template"]
    keys = ("csf_fraction", "ventricle_ml", "gm_wm_edge_mm", "thickness_mm", "pure_voxels")
    print(f"\n## Healthy anatomy ({anatomy['voxel_mm']:g} mm grid): healthy test subjects, "
          "median (range), against the template and published morphometry\n")
    print("| measure | ICBM template | phantom subjects | published / expected |")
    print("|---|---|---|---|")
    for key in keys:
        values = [r[key] for r in subjects]
        anchor = ANATOMY_ANCHORS.get(key, {})
        text = anchor.get("text", "-")
        if key == "thickness_mm":
            text += f" ({FISCHL_2000})"
        print(f"| {key} | {rows['template'][key]:.3f} | {np.median(values):.3f} "
              f"({min(values):.3f}-{max(values):.3f}) | {text} |")


def region_volumes(template) -> dict:
    """Parenchyma volume (ml) of each region and territory of the template itself, and the
    label maps {'region', 'territory'} [D, H, W]."""
    coords = np.indices(template.shape).astype(np.float32)
    labels = phantom_regions.subject_regions(coords, template.affine, template.brainmask)
    parenchyma = (template.gm + template.wm) * template.brainmask
    voxel_ml = template.voxel_size_mm**3 / 1000.0
    out = {}
    for key, names in (("region", phantom_regions.REGIONS),
                       ("territory", phantom_regions.TERRITORIES)):
        out[key] = {name: round(float(parenchyma[labels[key] == i].sum()) * voxel_ml, 1)
                    for i, name in enumerate(names) if i}
    return out, labels


def save_regions(template, labels: dict, path: str) -> None:
    """Axial and sagittal views of the lobe and territory partition on the T1 template."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def index(mm, axis):
        return int(round((mm - template.affine[axis, 3]) / template.affine[axis, axis]))

    views = [("region", 2, z, f"lobes, axial z = {z} mm") for z in (-25, -5, 15, 45)]
    views += [("region", 0, x, f"lobes, sagittal x = {x} mm") for x in (-45, -8)]
    views += [("territory", 0, x, f"territories, sagittal x = {x} mm") for x in (-45, -8)]
    background = template.t1 if template.t1 is not None else template.gm + 2 * template.wm
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    for ax, (key, axis, mm, title) in zip(axes.ravel(), views):
        k = index(mm, axis)
        take = (lambda v: v[:, :, k]) if axis == 2 else (lambda v: v[k])
        ax.imshow(take(background).T, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_equal(take(labels[key]).T, 0), cmap="tab10", vmin=0, vmax=9,
                  alpha=0.45, origin="lower", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    colours = plt.get_cmap("tab10")
    for names, y, what in ((phantom_regions.REGIONS, 0.51, "lobes"),
                           (phantom_regions.TERRITORIES, 0.01, "territories")):
        handles = [Patch(color=colours(i), alpha=0.6, label=n)
                   for i, n in enumerate(names) if i]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                   bbox_to_anchor=(0.5, y), title=what, title_fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1), h_pad=4.0)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_examples(folder: pathlib.Path, manifest: dict, path: str) -> None:
    """One test subject per kind (rows) in T1, T2, PD and FLAIR (columns), label in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = {}
    for entry in manifest["subjects"]:
        if entry["split"] in (schema.TEST_LESION, schema.TEST_HEALTHY):
            picks.setdefault(entry["kind"], entry)
    fig, axes = plt.subplots(len(picks), 4, figsize=(10, 2.7 * len(picks)), squeeze=False)
    for row, (kind, entry) in enumerate(picks.items()):
        seg = nifti.load_label(folder / entry["files"]["seg"]).data > 0
        z = int(np.argmax(seg.sum(axis=(0, 1)))) if seg.any() else seg.shape[2] // 2 + 5
        for col, modality in enumerate(phantom_signal.MODALITIES):
            image = nifti.load_nifti(folder / entry["files"][modality]).data[:, :, z]
            ax = axes[row, col]
            ax.imshow(image.T, cmap="gray", origin="lower",
                      vmax=float(np.percentile(image[image > 0], 99.5)))
            if seg[:, :, z].any():
                ax.contour(seg[:, :, z].T, [0.5], colors="r", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{entry['id']} {kind}: {modality}" if col == 0 else modality,
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="default", help="configs/phantom.py variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolutions", default="native,3",
                        help="evaluation grids: 'native' (the phantom's own grid), '3' (cpu)")
    parser.add_argument("--modalities", default="flair,t2")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument("--regions", default="",
                        help="also save a PNG of the lobe / territory partition")
    parser.add_argument("--examples", default="",
                        help="also save a PNG of one test subject per kind in every modality")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    folder = dataset(args.variant, args.seed)
    manifest = nifti.read_manifest(folder)
    print(f"phantom {args.variant} seed {args.seed} (generator {manifest.get('generator')}), "
          f"{folder}: {time.perf_counter() - start:.1f} s")
    rows = []
    for resolution in args.resolutions.split(","):
        for modality in args.modalities.split(","):
            results = threshold_results(folder, manifest, resolution, modality)
            grid = 3 if resolution == "3" else manifest["voxel_size_mm"]
            for kind, entry in results["kinds"].items():
                rows.append({
                    "kind": kind, "modality": modality, "grid_mm": grid,
                    "oracle_dice": entry["oracle"]["pooled"]["dice"],
                    "ap": entry["oracle"]["pooled"]["ap"],
                    "val_dice": entry["val"]["pooled"]["dice"] if "val" in entry else np.nan,
                    "per_volume_dice": entry["oracle"]["per_volume"]["dice"]["mean"],
                })
    print_threshold_table(rows)
    if args.examples:
        save_examples(folder, manifest, args.examples)
    stats = lesion_statistics(folder, manifest)
    print_lesion_table(stats)
    config = phantom_configs.get_config(args.variant)
    print_location_table(stats, config)
    volumes, labels = region_volumes(load_template(config.template))
    print("\nParenchyma volume of the partition on the template (ml): "
          + ", ".join(f"{k} {v:g}" for k, v in {**volumes["region"],
                                                **volumes["territory"]}.items()))
    if args.regions:
        save_regions(load_template(config.template), labels, args.regions)
    print_compartment_table(phantom_configs.get_config(args.variant))
    anatomy = anatomy_statistics(args.variant, args.seed, manifest)
    print_anatomy_table(anatomy)
    print(f"\n{time.perf_counter() - start:.1f} s in all")
    out = {"variant": args.variant, "seed": args.seed, "generator": manifest.get("generator"),
           "threshold": rows, "lesions": stats, "anatomy": anatomy, "regions": volumes}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
