"""Two gloo ranks each score one image; after all_reduce both hold the scores of both images."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resam_dist.eval.metrics import ImagewiseMeter

pytestmark = pytest.mark.distributed


def _images():
    # Image 0: tp 3 fp 1 fn 1 (IoU 0.6); image 1: tp 1 fp 0 fn 3 (IoU 0.25).
    gt0 = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [1, 1]]], dtype=torch.bool)
    pred0 = torch.tensor([[[1, 0], [0, 0]], [[1, 0], [1, 1]]], dtype=torch.bool)
    gt1 = torch.ones(1, 2, 2, dtype=torch.bool)
    pred1 = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.bool)
    return [(pred0, gt0), (pred1, gt1)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        meter = ImagewiseMeter()
        pred, gt = _images()[rank]
        meter.update(pred, gt)
        meter.all_reduce()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(meter.compute(), f)
    finally:
        dist.destroy_process_group()


def test_meter_all_reduce_two_ranks(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = ImagewiseMeter()
    for pred, gt in _images():
        single.update(pred, gt)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["miou"] == pytest.approx(0.425)
        assert got == pytest.approx(expected)
