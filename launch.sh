#!/usr/bin/env bash
# uadjax launcher: creates the environment on first use, then runs a job.
#
#   ./launch.sh              the main job: phantom -> shards -> train -> evaluate -> report
#   ./launch.sh test         the test suite
#   ./launch.sh <mode> ...   any uadjax mode (phantom, prepare, train, evaluate, predict, run)
#   ./launch.sh prepare_datasets ...   BraTS, IXI, ... folders -> a dataset folder (--list)
#   ./launch.sh benchmark --methods=all --seeds=0,1,2   methods x seeds -> leaderboard
#
# Several hosts (TPU pod slice, multi-node GPU): start the same command on every host with
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i ./launch.sh train ...
# (or UADJAX_DISTRIBUTED=1 where JAX detects the cluster itself: TPU pods, SLURM).
# Extra arguments of the main job are passed on: ./launch.sh main --config.train.num_steps=2000
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${UADJAX_VENV:-$ROOT/.venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.12 python3.11 python3; do
    # stderr silenced: pyenv shims of absent versions print "command not found" when run
    if command -v "$c" >/dev/null 2>&1 && \
        "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      PY=$c; break
    fi
  done
fi
[ -n "$PY" ] || { echo "launch.sh: Python >= 3.11 is required" >&2; exit 1; }

# Dependencies: the pinned versions of requirements.lock (those the test suite passed with),
# or with UADJAX_UNPINNED=1 the newest releases pyproject.toml allows.
stamp="$VENV/.uadjax-installed"
if [ "${UADJAX_UNPINNED:-0}" = 1 ]; then want=unpinned; constraints=(); else
  want=pinned; constraints=(-c requirements.lock); fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ] \
    || [ "$(cat "$stamp")" != "$want" ]; then
  echo "launch.sh: setting up the environment in $VENV ($want dependencies)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "${constraints[@]}" -e ".[test]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"

mode=${1:-main}
[ $# -gt 0 ] && shift
case "$mode" in
  test)
    # Two pytest workers (pytest-xdist): 13 min instead of 16 on 2 cores; most tests wait
    # on one-threaded XLA compiles. UADJAX_TEST_WORKERS=0 runs in one process.
    workers=${UADJAX_TEST_WORKERS:-2}
    if [ "$workers" = 0 ]; then exec python -m pytest -q "$@"; fi
    exec python -m pytest -q -n "$workers" "$@" ;;
  prepare_datasets)
    exec python -m data_prep.datasets "$@" ;;
  benchmark)
    exec python -m uadjax.benchmark "$@" ;;
  main)
    exec python -m uadjax.main run --config=configs/ddpm.py:cpu --workdir=runs/main "$@" ;;
  *)
    exec python -m uadjax.main "$mode" "$@" ;;
esac
