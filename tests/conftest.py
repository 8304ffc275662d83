"""Test set-up: simulate 8 CPU devices before JAX starts, so sharded paths are exercised."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the test workers and the subprocesses they start:
# tests that build the same tiny networks (and every resumed or restarted run) load the
# compiled executable instead of compiling it again. Results are unchanged (same executable).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from uadjax import xla_flags  # noqa: E402  (after the environment, before JAX starts)

xla_flags.set_cpu_flags()  # as the CLI does, so tests compute what the commands compute

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """One tiny phantom and its shards, shared by every end-to-end test of the session.

    Returns the `data` ConfigDict of the tiny configs with `phantom_dir` and `data_dir` set
    (shards of other modality lists go to their own builder folder under the same data_dir).
    """
    from configs import ddpm
    from uadjax import jobs

    root = tmp_path_factory.mktemp("tiny_data")
    config = ddpm.get_config("tiny")
    config.data.phantom_dir = str(root / "phantom")
    config.data.data_dir = str(root / "shards")
    jobs.ensure_shards(config, progress=False)
    return config.data


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A 2-step DDPM run on the tiny phantom, evaluated (shared by several tests).

    Returns the ConfigDict of the run (paths inside a session temporary folder).
    """
    from configs import ddpm
    from uadjax import jobs

    config = ddpm.get_config("tiny")
    config.data.phantom_dir = tiny_data.phantom_dir
    config.data.data_dir = tiny_data.data_dir
    config.workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    jobs.run_all(config, config.workdir, progress=False)
    return config
