"""Generate the built-in phantom dataset.

  python -m data_prep.phantom --out DIR --seed 0 [--config configs/phantom.py:default]
                              [--overwrite] [--workers N] [--quiet]

Writes DIR/manifest.json and one folder per subject (docs/CONTRACTS.md). The same seed and
config give byte-identical files; a DIR that already holds them is left as is (cached).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

from uadjax.data import phantom

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/phantom.py:default"


def load_config(spec: str):
    """'path/to/file.py:arg' -> the file's get_config(arg) (path relative to cwd or repo)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file() and (REPO_ROOT / path).is_file():
        file = REPO_ROOT / path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"_phantom_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="file.py:variant")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if cached")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: 2 for large datasets, else 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    start = time.perf_counter()
    manifest = phantom.generate_dataset(args.out, config, seed=args.seed,
                                        progress=not args.quiet, overwrite=args.overwrite,
                                        workers=args.workers)
    print(f"phantom: {len(manifest['subjects'])} subjects in {args.out} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
