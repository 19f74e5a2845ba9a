"""DeepSpeed's node-local options on two gloo ranks of which only rank 1 is bound to one GPU (its
device index differs from its local rank): both ranks refuse them, so none goes on alone into
DeepSpeed's start-up collectives; without the option neither refuses."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resam_dist.distributed import DistInfo, check_node_local_options
from train_helpers import free_port

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 0: local rank 0 on cuda:0 (not bound); rank 1: local rank 1 bound to the one GPU it sees
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cuda", 0), backend="gloo")
        outcome = {}
        for name, ds_config in (("plain", {"zero_optimization": {"stage": 2}}),
                                ("node_local", {"checkpoint": {"use_node_local_storage": True}})):
            try:
                check_node_local_options(ds_config, info, "cfg.json")
                outcome[name] = "accepted"
            except ValueError as error:
                outcome[name] = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(outcome, file)
    finally:
        dist.destroy_process_group()


def test_every_rank_refuses_when_one_rank_is_bound(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["plain"] == "accepted"
        assert outcome["node_local"].startswith(
            "cfg.json: key 'deepspeed.checkpoint.use_node_local_storage' needs ranks that see all of their "
            "node's GPUs"), (rank, outcome)
