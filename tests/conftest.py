"""Shared fixtures: one real Ray head (token auth on) per test session, and the tiny base LM."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# Ray reads its auth mode once, when first imported (test modules import it at collection), so
# the session's token must be in the environment before any test module loads.
os.environ.update(
    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0"
)
# pretrain_lm overrides for a model that trains in seconds (runner tests, not accuracy).
SMALL = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
    "model.intermediate_size=64", "world.train_size=400", "world.eval_size=8",
    "runner.max_steps=12", "runner.checkpoint_every=4", "runner.log_every=1",
    "runner.micro_batch_size=4", "runner.warmup_steps=2",
]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    address: str
    dashboard_url: str
    token: str


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> Cluster:
    """`ray start --head` with token authentication, shared by every test that needs Ray."""
    token = os.environ["RAY_AUTH_TOKEN"]
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=REPO,
        # Submitted jobs run `python ...`: make it this interpreter.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while subprocess.run([RAY, "status", f"--address={address}"], capture_output=True).returncode:
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail("the Ray head did not start")
        time.sleep(2)
    os.environ["RAY_ADDRESS"] = address
    import ray

    ray.init(address=address, log_to_driver=True)
    yield Cluster(address, dashboard_url, token)
    ray.shutdown()
    head.terminate()
    head.wait(timeout=60)


@pytest.fixture(scope="session")
def kiln_cache(tmp_path_factory) -> Path:
    """A fresh model cache per session, so the session really trains what it checks."""
    path = tmp_path_factory.mktemp("kiln-cache")
    os.environ["KILN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(ray_cluster, kiln_cache) -> Path:
    """`pretrain_lm --preset tiny` (2 workers, ZeRO-2), trained once per session."""
    from jobs.pretrain_lm import JOB
    from jobs.runner import cached_run
    from kiln.config import load_config

    return cached_run(JOB, load_config(JOB.config_cls, "tiny"))
