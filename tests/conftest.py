"""Shared test set-up: Triton's interpreter on CPU machines, GPU marker handling."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors only through the interpreter, which must be switched on
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_rank_world(monkeypatch):
    """A one-rank gloo world in this process (resam_dist.distributed.init_distributed with the
    given collective timeout, no launcher variables), closed afterwards. A process group already up
    (left by another test) fails the test."""
    from torch.distributed import distributed_c10d

    import deepspeed
    from resam_dist import distributed
    if torch.distributed.is_initialized():
        pytest.fail("a process group is already up in this process (left by an earlier test)")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
                 "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown also undoes what init_distributed sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setattr(distributed_c10d, "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout)
    monkeypatch.setattr(deepspeed.utils.groups, "_WORLD_GROUP", None)  # (a group of an earlier world)

    def start(timeout_s: float):
        return distributed.init_distributed(timeout_s, local_rank_arg=0)

    try:
        yield start
    finally:
        distributed.close()
