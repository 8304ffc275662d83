"""Benchmark: several methods, one dataset, one protocol, several seeds -> a leaderboard.

    python -m uadjax.benchmark --methods=all --size=cpu --budget=short --seeds=0,1,2
    ./launch.sh benchmark --methods=ddpm,ddpm+ens,pddpm,cddpm --seeds=0 --root=runs/bench
    ./launch.sh benchmark --methods=all --size=paper --dataset_dir=data/behrendt_t2

A method is `<config>[:<training modifiers>][+<test-time modifiers>]`: `ddpm`, `ddpm+ens`
(the DDPM run scored with the t ensemble), `mmccd:cyclic`, `disyre+multistep`; `all` is the
list in configs/benchmark.py; `threshold` is the intensity-threshold baseline. Every run lives in
`<root>/<config>-<size>_<budget>[_<modifiers>]/seed<k>/`: what is trained is not trained
again, a half-trained run resumes, an evaluated one is read back. Evaluation uses the configured
protocol for every method (validation-selected threshold, oracle labelled separately).

Writes to `<root>/`: leaderboard.md, leaderboard.csv (one row per method, lesion kind and
metric), leaderboard.json, and figures: maps_<kind>.png (the same test subjects across
methods), pr_<kind>.png (pooled PR curves), speed_accuracy.png. Markdown cells are mean ±
std over seeds of the per-volume means; p is a paired permutation test of per-volume Dice
(averaged over seeds) between the best method of a lesion kind and each other one.

Modules: `entries` (entries, protocol, run folder names), `running` (train and evaluate,
read results back), `ranking` (leaderboard, tables, budget curve), `figures`, `cli` (the
command: parse, run, write, publish).
"""

from uadjax.benchmark.cli import main

__all__ = ["main"]
