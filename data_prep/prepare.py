"""Dataset folder (CONTRACTS.md format) -> slice shards.

    python -m data_prep.prepare --dataset_dir DIR --out DATA_DIR \
        --config configs/data.py:cpu [--modalities t2,flair] [--dataset_name NAME]

The shard name is '<dataset>_<modalities>_<size>[_<normalisation>]'; the dataset name is
the manifest's `dataset` unless --dataset_name is given. Subjects that fail are skipped and
listed at the end; the exit status is 1 if any failed (the others are still written) and
2 if nothing could be prepared (the error names each input and its problem).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from uadjax.data import builder, nifti
from uadjax.data.schema import DataError


def load_config(spec: str):
    """Loads `path/to/file.py[:arg]` by calling the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Prepare uadjax slice shards.")
    parser.add_argument("--dataset_dir", required=True, help="folder with manifest.json")
    parser.add_argument("--out", required=True, help="data dir receiving the shards")
    parser.add_argument("--config", default="configs/data.py:cpu",
                        help="config file and variant, e.g. configs/data.py:paper")
    parser.add_argument("--modalities", default=None, help="comma list, e.g. t2,flair")
    parser.add_argument("--dataset_name", default=None,
                        help="name in the shard name (default: the manifest's 'dataset')")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Runs the preparation; returns the exit status.

    0: every subject written; 1: some failed (listed; the others are written); 2: nothing
    could be prepared (bad config, missing or empty manifest, every subject failed).
    """
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        if args.modalities:
            config.modalities = tuple(m.strip() for m in args.modalities.split(",")
                                      if m.strip())
        if args.dataset_name:
            config.dataset = args.dataset_name
        else:
            manifest = nifti.read_manifest(args.dataset_dir)
            config.dataset = str(manifest.get("dataset", config.dataset))
        report = builder.prepare_dataset(args.dataset_dir, args.out, config,
                                         progress=not args.quiet)
    except (DataError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.ok:
        print(f"{len(report.failures)} subject(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
