"""The phantom against the real datasets: threshold baselines and lesion statistics.

    python -m benchmarks.phantom_calibration [--variant default] [--seed 0]
        [--resolutions 2,3] [--modalities flair,t2] [--json out.json]

Generates (or reuses, cached in `.cache/phantom`) the phantom variant, then prints
  1. the intensity-threshold baseline per lesion kind, modality and resolution, on the
     project's own evaluation path (`preprocess_files` -> `evaluate.evaluate_scores`, the
     code `./launch.sh run --config=configs/threshold.py:cpu,flair` runs): best-possible
     pooled Dice (threshold chosen on the test volumes), pooled AUPRC, and the Dice at the
     threshold selected on the lesion-validation subjects, next to the published FLAIR
     figures (Meissen et al., BrainLes 2021, Table 2) and the calibration targets;
  2. the lesion volumes and counts per kind (test and validation lesion subjects) against
     the published distributions of docs/phantom.md;
  3. each lesion compartment's signal over WM and GM in T1, T2, PD and FLAIR (the signal
     equations with the nominal tissue parameters), and, measured on the images, where the
     median lesion voxel sits among the same subject's healthy brain voxels.

Resolutions: 3 = the CPU configs' grid (configs/data.py:cpu, 64x64 at 3 mm, cpu evaluation
post-processing); 2 = the phantom's native 2 mm grid (no resampling, the whole brain, the
paper-size post-processing); 1 = the 1 mm phantom (`--variant 1mm`, native, paper
post-processing at 1 mm).
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
from uadjax import evaluate
from uadjax.data import nifti, phantom, phantom_signal, preprocess, schema
from uadjax.inference.scoring import ScoredVolume
from uadjax.data.phantom_reference import ANCHORS, THRESHOLD_TARGETS

SPLITS = (schema.VAL_LESION, schema.TEST_LESION, schema.VAL_HEALTHY, schema.TEST_HEALTHY)


def dataset(variant: str, seed: int, root: str = ".cache/phantom") -> pathlib.Path:
    """The phantom folder of `variant` (generated unless cached with the same config)."""
    out = pathlib.Path(root) / f"{variant}-seed{seed}"
    config = phantom_configs.get_config(variant)
    phantom.generate_dataset(out, config, seed=seed,
                             overwrite=phantom.is_stale_cache(out, config, seed))
    return out


def grid_configs(resolution: int, modality: str, native_mm: float):
    """(data config, eval config) of one evaluation grid."""
    if resolution == 3:
        data = data_configs.get_config(f"cpu:{modality}")
        ecfg = common_configs.base_config("cpu").eval
    else:
        data = data_configs.get_config(f"paper:{modality}")
        data.target_spacing = None  # native grid
        data.image_size = (256, 256)  # the whole brain
        data.num_slices = None
        ecfg = common_configs.base_config("paper").eval
        if native_mm < 1.5:  # post-processing sized in mm: twice the voxels at 1 mm
            ecfg.erode_iterations = 2 * ecfg.erode_iterations
            ecfg.median_size = 2 * ecfg.median_size + 1
            ecfg.min_component_size = 8 * ecfg.min_component_size
    return data, ecfg


def threshold_results(folder: pathlib.Path, manifest: dict, resolution: int, modality: str):
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
    results, _ = evaluate.evaluate_scores(split_volumes, ecfg, spacing=spacing)
    return results


def print_threshold_table(rows: list[dict]) -> None:
    print("\n## Intensity threshold (pooled over the test volumes of each kind)\n")
    print("| kind | modality | grid | Dice, best possible | AUPRC | Dice, val threshold "
          "| per-volume Dice | published (FLAIR) | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        anchor = THRESHOLD_TARGETS.get((r["kind"], r["modality"]), {})
        target = anchor.get("target", {}).get(r["grid_mm"])
        target = f"{target[0]:.2f}-{target[1]:.2f}" if target else "-"
        published = f"{anchor['published']:.3f} ({anchor['dataset']})" if anchor else "-"
        print(f"| {r['kind']} | {r['modality']} | {r['grid_mm']} mm | {r['oracle_dice']:.3f} | "
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
                                    "percentile": {m: [] for m in phantom_signal.MODALITIES},
                                    "ratio": {m: [] for m in phantom_signal.MODALITIES}})
        seg = nifti.load_label(folder / entry["files"]["seg"]).data > 0
        brain = nifti.load_label(folder / entry["files"]["brainmask"]).data > 0
        labels, count = ndimage.label(seg)
        sizes = ndimage.sum_labels(seg, labels, np.arange(1, count + 1)) * voxel_ml
        s["volume_ml"].append(float(seg.sum()) * voxel_ml)
        s["count"].append(int(count))
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
    print("\n## Image contrast: percentile of the median lesion voxel among the subject's "
          "healthy brain voxels, median (range)\n")
    print("| kind | " + " | ".join(phantom_signal.MODALITIES) + " |")
    print("|---|" + "---|" * len(phantom_signal.MODALITIES))
    for kind, s in stats.items():
        cells = [f"{np.median(s['percentile'][m]):.0f} ({np.min(s['percentile'][m]):.0f}-"
                 f"{np.max(s['percentile'][m]):.0f})" for m in phantom_signal.MODALITIES]
        print(f"| {kind} | " + " | ".join(cells) + " |")


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="default", help="configs/phantom.py variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolutions", default="2,3",
                        help="evaluation grids in mm: 3 (cpu configs), 2 or 1 (native)")
    parser.add_argument("--modalities", default="flair,t2")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    folder = dataset(args.variant, args.seed)
    manifest = nifti.read_manifest(folder)
    print(f"phantom {args.variant} seed {args.seed} (generator {manifest.get('generator')}), "
          f"{folder}: {time.perf_counter() - start:.1f} s")
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        for modality in args.modalities.split(","):
            results = threshold_results(folder, manifest, resolution, modality)
            grid = resolution if resolution == 3 else round(manifest["voxel_size_mm"])
            for kind, entry in results["kinds"].items():
                rows.append({
                    "kind": kind, "modality": modality, "grid_mm": grid,
                    "oracle_dice": entry["oracle"]["pooled"]["dice"],
                    "ap": entry["oracle"]["pooled"]["ap"],
                    "val_dice": entry["val"]["pooled"]["dice"] if "val" in entry else np.nan,
                    "per_volume_dice": entry["oracle"]["per_volume"]["dice"]["mean"],
                })
    print_threshold_table(rows)
    stats = lesion_statistics(folder, manifest)
    print_lesion_table(stats)
    print_compartment_table(phantom_configs.get_config(args.variant))
    print(f"\n{time.perf_counter() - start:.1f} s in all")
    out = {"variant": args.variant, "seed": args.seed, "threshold": rows, "lesions": stats}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
