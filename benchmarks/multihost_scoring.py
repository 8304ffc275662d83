"""Scoring throughput of `evaluate` with 1 and with 2 jax.distributed processes here.

Trains a run for one step (the weights do not change the cost of scoring), then runs the
real `evaluate` command on it with one process (all CPU cores, one device) and with two
processes on this machine (localhost coordinator, one device each, the cores shared), and
reads each process's scoring figures from `results.json` (`timing.per_process`). The
aggregate throughput is all the slices scored over the slowest process's scoring time.
On one machine two processes share the same cores, so the ideal ratio here is 1.0: the
figure measures the overhead of splitting the volumes (per-process compilation excluded,
load imbalance and store writes included). On a pod each host brings its own
accelerators, so the same split multiplies throughput by the host count, less that overhead.

    python benchmarks/multihost_scoring.py --config=configs/ddpm.py:cpu \\
        --out=docs/leaderboard/multihost_scoring.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_FLAGS", "UADJAX_DISTRIBUTED"))}
    env.update(JAX_PLATFORMS="cpu", **{k: str(v) for k, v in extra.items()})
    return env


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _run(args: list[str], processes: int) -> float:
    """Runs `python -m uadjax.main <args>` as `processes` processes; returns the wall time."""
    port = _port()
    start = time.perf_counter()
    procs = []
    for i in range(processes):
        extra = {} if processes == 1 else {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                           "JAX_NUM_PROCESSES": processes, "JAX_PROCESS_ID": i}
        procs.append(subprocess.Popen([sys.executable, "-m", "uadjax.main", *args], cwd=ROOT,
                                      env=_env(**extra), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode:
            raise SystemExit(f"{' '.join(args)} failed:\n{out[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ddpm.py:cpu")
    p.add_argument("--repeats", type=int, default=2, help="evaluations per process count")
    p.add_argument("--override", action="append", default=[],
                   help="extra --config.* flags, e.g. --override=--config.data.data_dir=...")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="multihost_scoring_"))
    common = [f"--config={args.config}", f"--workdir={workdir}", *args.override]
    try:
        _run(["train", *common, "--config.train.num_steps=1",
              "--config.train.val_every_steps=0", "--config.train.tensorboard=False"], 1)
        rows = []
        for processes in (1, 2) * args.repeats:
            shutil.rmtree(workdir / "eval", ignore_errors=True)
            wall = _run(["evaluate", *common], processes)
            timing = json.loads((workdir / "eval" / "results.json").read_text())["timing"]
            parts = timing["per_process"]
            slices = sum(t["slices_scored"] for t in parts)
            seconds = max(t["score_seconds"] for t in parts)
            rows.append({"processes": processes, "slices": slices,
                         "score_seconds": round(seconds, 2),
                         "slices_per_second": round(slices / seconds, 2),
                         "per_process": parts, "command_wall_seconds": round(wall, 1)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_process"}),
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best = {n: max(r["slices_per_second"] for r in rows if r["processes"] == n) for n in (1, 2)}
    ratio = best[2] / best[1]
    print(f"\nslices/s: 1 process {best[1]:.1f}, 2 processes {best[2]:.1f}; "
          f"ratio {ratio:.2f} (best of {args.repeats} each)")
    if args.out:
        from uadjax import atomic

        atomic.write_json(args.out, {"command": "python benchmarks/multihost_scoring.py "
                                                + " ".join(sys.argv[1:]),
                                     "config": args.config, "rows": rows,
                                     "best_slices_per_second": best, "ratio": ratio})


if __name__ == "__main__":
    main()
