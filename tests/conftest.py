"""Shared test helpers: small settings that keep every test fast on a 2-core CPU."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY_RUN = {
    "train-size": 120,
    "num-shards": 4,
    "num-rounds": 2,
    "local-epochs": 2,
    "batch-size": 16,
    "eval-every": 0,
    "eval-num-images": 60,
    "sample-steps": 4,
    "mq-neighbours": 10,
    "fid": False,
}


@pytest.fixture
def tiny_run(tmp_path):
    """Run-config overrides for an in-process simulation that finishes in seconds."""
    return {**TINY_RUN, "out-dir": str(tmp_path / "runs")}


@pytest.fixture
def flower_task():
    """Messages can only be made inside a Flower task: pretend to be one (ServerApp or ClientApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
