"""Test set-up: simulate 8 CPU devices before JAX starts, so sharded paths are exercised."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny phantom, its shards and a 2-step DDPM run, evaluated (shared by several tests).

    Returns the ConfigDict of the run (paths inside a session temporary folder).
    """
    from configs import ddpm
    from uadjax import jobs

    root = tmp_path_factory.mktemp("tiny_run")
    config = ddpm.get_config("tiny")
    config.data.phantom_dir = str(root / "phantom")
    config.data.data_dir = str(root / "shards")
    config.workdir = str(root / "run")
    jobs.run_all(config, config.workdir, progress=False)
    return config
