"""Public datasets in their own layouts -> a uadjax dataset folder (manifest.json).

    python -m data_prep.datasets --list                       # datasets, where to get them
    python -m data_prep.datasets --out /data/ixi_brats --preset behrendt \
        --source ixi=/raw/IXI --source brats2021=/raw/BraTS2021 --source mslub=/raw/MSLUB
    python -m data_prep.datasets --out /data/mine --source mine=/raw/scans \
        --pattern 'mine:t2={id}/{id}_T2.nii.gz' --pattern 'mine:seg={id}/{id}_lesion.nii.gz' \
        --kind mine=tumour

`--source NAME=DIR` names a known adapter (`uadjax/data/datasets.py`) or, with `--pattern`
and `--kind`, any folder of NIfTI scans. `--shards DATA_DIR` also builds the slice shards with
the preset's (or `--data_config`'s) preprocessing. Exit status: 0 when every subject was
written, 1 when some failed (the others are written and listed), 2 when nothing could be done.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from configs import data as data_configs
from data_prep.prepare import load_config
from uadjax.data import dataset_folder, datasets
from uadjax.data.schema import DataError


def _pairs(values, what: str, sep: str = "=") -> list:
    out = []
    for value in values or []:
        key, found, rest = value.partition(sep)
        if not found or not key or not rest:
            raise ValueError(f"{what}: expected KEY{sep}VALUE, got {value!r}")
        out.append((key.strip(), rest.strip()))
    return out


def make_sources(args) -> list:
    """The `Source`s of the command line (known adapters and pattern-described folders)."""
    patterns, kinds, labels, split_files = {}, dict(_pairs(args.kind, "--kind")), {}, {}
    for name, rest in _pairs(args.pattern, "--pattern", ":"):
        key, value = _pairs([rest], "--pattern")[0]
        patterns.setdefault(name, {}).setdefault(key, []).append(value)
    for name, values in _pairs(args.labels, "--labels"):
        labels[name] = tuple(int(v) for v in values.split(","))
    for name, rest in _pairs(args.split_file, "--split_file", ":"):
        split, path = _pairs([rest], "--split_file")[0]
        split_files.setdefault(name, {})[split] = Path(path)
    preset = datasets.get_preset(args.preset) if args.preset else None
    sources = []
    for name, root in _pairs(args.source, "--source"):
        if name in patterns:
            spec = datasets.generic_spec(
                name, kinds.get(name, "healthy"), patterns[name], labels=labels.get(name),
                skull_stripped=not args.not_skull_stripped)
        else:
            spec = datasets.get_spec(name)
        if preset and name in preset.split_sizes:
            spec = datasets.with_split_sizes(spec, preset.split_sizes[name])
        sources.append(dataset_folder.Source(spec=spec, root=Path(root),
                                             split_files=split_files.get(name, {})))
    return sources


STEPS = ("register", "n4", "atlas_mask", "skull_strip", "curvature_flow")  # SpatialOptions


def spatial_options(args, preset):
    """`SpatialOptions` from the preset, overridden by explicit flags; None when no step."""
    wanted = dict(preset.spatial) if preset else {}
    for flag in STEPS:
        if getattr(args, flag):
            wanted[flag] = True
    if args.no_spatial:
        wanted = {}
    if args.spacing:
        wanted["spacing"] = (args.spacing,) * 3
    if not any(wanted.get(k) for k in STEPS):
        return None
    from uadjax.data import spatial

    return spatial.SpatialOptions(**wanted, seed=args.seed)


def list_datasets() -> str:
    lines = ["Datasets (--source NAME=DIR):"]
    for name, spec in datasets.SPECS.items():
        lines.append(f"\n{name} [{spec.kind}; modalities {', '.join(spec.modalities)}]\n  "
                     + spec.instructions)
    lines.append("\nPresets (--preset NAME):")
    for name, preset in datasets.PRESETS.items():
        lines.append(f"\n{name} (configs/data.py:{preset.data_config})\n  {preset.note}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print datasets and presets, exit")
    p.add_argument("--out", help="dataset folder to write")
    p.add_argument("--source", action="append", help="NAME=DIR (repeatable)")
    p.add_argument("--preset", choices=sorted(datasets.PRESETS), help="a seed paper's recipe")
    p.add_argument("--modalities", help="comma list, e.g. t2 or t1,t2 (default: preset's, t2)")
    p.add_argument("--pattern", action="append", help="NAME:KEY=PATTERN for a generic source")
    p.add_argument("--kind", action="append", help="NAME=KIND for a generic source")
    p.add_argument("--labels", action="append", help="NAME=0,1,2 allowed label values")
    p.add_argument("--not_skull_stripped", action="store_true",
                   help="generic sources hold whole heads")
    p.add_argument("--split_file", action="append",
                   help="NAME:SPLIT=FILE: the subjects named in FILE go to SPLIT")
    for flag, text in (("register", "affine registration to the ICBM 2009c template"),
                       ("n4", "N4 bias-field correction"),
                       ("atlas_mask", "brain mask from the template where none is given"),
                       ("skull_strip", "zero the images outside the brain mask"),
                       ("curvature_flow", "SimpleITK CurvatureFlow smoothing of every image "
                                          "(Behrendt's reader: time step 0.125, 3 iterations)")):
        p.add_argument(f"--{flag}", action="store_true", help=text)
    p.add_argument("--no_spatial", action="store_true", help="skip the preset's spatial steps")
    p.add_argument("--spacing", type=float, help="output voxel size (mm) when registering")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--name", default="", help="dataset name (default: the source names)")
    p.add_argument("--jobs", type=int, default=dataset_folder.default_jobs())
    p.add_argument("--overwrite", action="store_true", help="redo subjects already written")
    p.add_argument("--shards", help="also build slice shards into this data dir")
    p.add_argument("--data_config", help="preprocessing config for --shards "
                                         "(default: the preset's, else configs/data.py:paper)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_datasets())
        return 0
    if not args.out or not args.source:
        print("error: --out and at least one --source are required (see --list)",
              file=sys.stderr)
        return 2
    preset = datasets.get_preset(args.preset) if args.preset else None
    modalities = (tuple(m.strip() for m in args.modalities.split(",") if m.strip())
                  if args.modalities else (preset.modalities if preset else ("t2",)))
    try:
        sources = make_sources(args)
        options = spatial_options(args, preset)
        for source in sources:
            if not source.spec.skull_stripped and (options is None or not (
                    options.skull_strip or options.atlas_mask)):
                print(f"warning: {source.spec.name} images are not skull-stripped; without "
                      "--atlas_mask --skull_strip (or brain masks) the 'brain' is the whole head",
                      file=sys.stderr)
        report = dataset_folder.build_dataset_folder(
            sources, args.out, modalities=modalities, spatial=options, seed=args.seed,
            name=args.name, jobs=args.jobs, overwrite=args.overwrite, progress=not args.quiet,
            provenance={"preset": args.preset, "command": " ".join(sys.argv)})
    except (DataError, KeyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    written = sum(report.num_subjects.values())
    if args.shards and written:
        from uadjax.data import builder

        start = time.perf_counter()
        try:
            if args.data_config:
                config = load_config(args.data_config)
            else:
                config = data_configs.get_config(preset.data_config if preset else "paper")
            config.modalities = modalities
            config.dataset = args.name or "_".join(s.spec.name for s in sources)
            shards = builder.prepare_dataset(args.out, args.shards, config,
                                             progress=not args.quiet)
        except (DataError, ValueError, OSError) as err:
            print(f"error: shards: {err}", file=sys.stderr)
            return 2
        print(shards.summary())
        print(f"shards: {time.perf_counter() - start:.1f} s")
        report.failures += shards.failures
    if not written:
        print("error: no subject could be written", file=sys.stderr)
        return 2
    if report.failures:
        print(f"{len(report.failures)} subject(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
