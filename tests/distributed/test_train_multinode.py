"""The multi-node path on one machine: two separately started `torchrun --nnodes 2
--nproc-per-node 1 --rdzv-backend c10d` agents (as train_torchrun.sbatch starts them) train ZeRO-3
for a few steps with gradient accumulation. Both ranks are local rank 0, global ranks 0 and 1. Rank 1's loss is NaN at
step 2 (faults.nan_loss_step): the step is skipped on BOTH ranks and counted. The exported
adapter and merged weights give the same model."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import BIN, REPO, TRAIN_SCRIPT, clean_env, free_port, write_config

pytestmark = pytest.mark.distributed

SKIPPED_ONCE = {"nonfinite": 1, "spike": 0, "nonfinite_grad": 0}  # the skip counts by reason

STEPS = 3
ACCUM = 2  # micro-batches per optimizer step


@pytest.fixture(scope="module")
def multinode(train_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    config = write_config(base / "config.json", shards=train_shards, output_dir=base / "run", overrides={
        "deepspeed.zero_optimization.stage": 3, "train.max_steps": STEPS, "train.grad_accum_steps": ACCUM,
        "faults.nan_loss_step": 2, "faults.nan_loss_rank": 1})
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(2):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", endpoint, "--rdzv-id", "resam-multinode-test", str(TRAIN_SCRIPT),
               "--config", str(config)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=open(base / f"node{node}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [(base / f"node{node}.log").read_text() for node in range(2)]
    return {"base": base, "codes": codes, "logs": logs}


def test_two_single_rank_nodes_train_with_zero3(multinode):
    assert multinode["codes"] == [0, 0], "\n".join(log[-3000:] for log in multinode["logs"])
    identities = set()
    for log in multinode["logs"]:
        identities.update(re.findall(r"\[rank (\d)/2 local_rank (\d) on ", log))
    assert identities == {("0", "0"), ("1", "0")}  # global ranks 0 and 1, both local rank 0
    records = read_jsonl(multinode["base"] / "run" / "train_log.jsonl")
    start = records[0]
    assert start["zero_stage"] == 3 and start["world_size"] == 2
    assert [(r["rank"], r["local_rank"]) for r in start["ranks"]] == [(0, 0), (1, 0)]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, STEPS + 1))


def test_a_nan_loss_on_one_rank_skips_the_step_on_all_ranks(multinode):
    records = read_jsonl(multinode["base"] / "run" / "train_log.jsonl")
    skips = [r for r in records if r["event"] == "skip"]
    assert len(skips) == 1
    assert skips[0]["step"] == 2 and skips[0]["reason"] == "nonfinite" and skips[0]["nonfinite_ranks"] == 1
    assert records[-1]["event"] == "end" and records[-1]["skipped"] == SKIPPED_ONCE
    ckpt = multinode["base"] / "run" / "checkpoints" / "step_00000003"
    for rank in range(2):
        client = torch.load(ckpt / f"client_rank{rank:05d}.pt", weights_only=False)
        assert client["skipped"] == SKIPPED_ONCE
        assert client["data_position"] == (STEPS * ACCUM + 1) * 2  # the skipped micro-batch was consumed too
    steps = {r["step"]: r for r in records if r["event"] == "step"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    assert all(r["images"] == 2 * ACCUM * 2 for r in steps.values())  # ranks x micro-batches x images


def test_exports_give_the_same_model(multinode):
    from resam_dist.config import load_config
    from resam_dist.model.build import build_sam
    from resam_dist.model.lora import load_adapter
    from safetensors.torch import load_file

    export = multinode["base"] / "run" / "export"
    adapter = load_file(export / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and adapter[k].abs().sum() > 0 for k in adapter)  # LoRA trained
    seed = load_config(multinode["base"] / "config.json").train.seed
    with_adapter = load_adapter(build_sam("tiny", seed=seed), export / "adapter").eval()
    merged = build_sam("tiny", export / "sam_merged.pth").eval()
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(with_adapter.encode(images), merged.encode(images), atol=1e-4, rtol=1e-4)
