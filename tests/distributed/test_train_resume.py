"""ZeRO-2 on 2 gloo ranks with activation checkpointing: an uninterrupted run, a run whose rank 1
is SIGKILLed mid-run (rank 0 must stop by itself with a message), and its relaunch, which resumes
from `latest` and reproduces the uninterrupted losses bit for bit (CPU, fp32)."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import (deepspeed_cmd, run, signal_rank_after_step, start_ranks, step_losses, torchrun_cmd,
                           write_config)

pytestmark = pytest.mark.distributed

K = 3                  # checkpoint period; the uninterrupted run takes 2K steps
TIMEOUT_S = 20         # collective timeout of the killed run


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    # the schedule counts images: 2 ranks x 2 images a step, warm-up 8 images, the milestone at 12
    common = {"deepspeed.zero_optimization.stage": 2, "checkpoint.every_steps": K, "checkpoint.keep_last": 2,
              "train.collective_timeout_s": TIMEOUT_S, "train.activation_checkpointing": "all",
              "train.schedule_unit": "images", "train.warmup_steps": 8, "train.milestones": [12]}
    straight_cfg = write_config(base / "straight.json", shards=train_shards, output_dir=base / "straight",
                                overrides={**common, "train.max_steps": 2 * K})
    straight = run(deepspeed_cmd(straight_cfg), log=base / "straight.log")
    # a relaunch over it whose config builds other frozen weights (another seed of the random base)
    reseeded_cfg = write_config(base / "reseeded.json", shards=train_shards, output_dir=base / "straight",
                                overrides={**common, "train.max_steps": 2 * K + 1, "train.seed": 7})
    reseeded = run(torchrun_cmd(reseeded_cfg), log=base / "reseeded.log")
    # and one at another ZeRO stage group (DeepSpeed itself would fail on the optimizer files)
    restaged = run(torchrun_cmd(straight_cfg, "--set", "deepspeed.zero_optimization.stage=0", "--set",
                                f"train.max_steps={2 * K + 1}"), log=base / "restaged.log")
    # and one step more over a copy of it at a tenth of its lr
    shutil.copytree(base / "straight", base / "relr")
    trained_lr = json.loads((base / "straight" / "config.json").read_text())["train"]["lr"]
    relr_cfg = write_config(base / "relr.json", shards=train_shards, output_dir=base / "relr",
                            overrides={**common, "train.max_steps": 2 * K + 1, "train.lr": trained_lr / 10,
                                       "train.grad_clip": 0.5, "train.warmup_steps": 4})
    relr = run(torchrun_cmd(relr_cfg), log=base / "relr.log")

    # the killed run: two plain processes (no launcher that would end rank 0 for us); it would
    # run 50 steps, rank 1 is SIGKILLed once rank 0 logged step K + 1 (checkpoint K is complete)
    killed_dir = base / "killed"
    killed_cfg = write_config(base / "killed.json", shards=train_shards, output_dir=killed_dir,
                              overrides={**common, "train.max_steps": 50})
    procs = start_ranks(killed_cfg, log_dir=base, name="killed")
    survivor_rc, survivor_seconds = signal_rank_after_step(
        procs, log_path=killed_dir / "train_log.jsonl", step=K + 1, sig=signal.SIGKILL, wait_s=TIMEOUT_S + 60)
    resumed = run(torchrun_cmd(killed_cfg, "--set", f"train.max_steps={2 * K}"), log=base / "resumed.log")
    return {"base": base, "straight": straight, "reseeded": reseeded, "restaged": restaged, "resumed": resumed,
            "relr": relr, "trained_lr": trained_lr,
            "survivor_rc": survivor_rc,
            "survivor_seconds": survivor_seconds, "survivor_log": (base / "killed_rank0.log").read_text()}


def test_uninterrupted_run_checkpoints_atomically_and_exports(runs):
    assert runs["straight"].returncode == 0, runs["straight"].stdout[-4000:]
    out = runs["base"] / "straight"
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000003", "step_00000006"]
    assert not list(ckpt.glob(".tmp-*"))
    # the queue is one queue: identical on both ranks, bit for bit, and filled
    rank0 = torch.load(ckpt / "step_00000006" / "client_rank00000.pt", weights_only=False)
    rank1 = torch.load(ckpt / "step_00000006" / "client_rank00001.pt", weights_only=False)
    assert rank0["step"] == rank1["step"] == 2 * K
    assert rank0["step_state"]["fill"] == rank1["step_state"]["fill"] > 0
    assert torch.equal(rank0["step_state"]["entries"], rank1["step_state"]["entries"])
    assert rank0["data_position"] == rank1["data_position"] == 2 * K * 2  # 2 images per rank per step
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file()
    merged = torch.load(out / "export" / "sam_merged.pth", weights_only=True)
    assert any(k.startswith("image_encoder.blocks.0.attn.qkv.weight") for k in merged)
    assert not any("lora" in k for k in merged)
    records = read_jsonl(out / "train_log.jsonl")
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "end"
    # warm-up and milestone in images, 4 a step: 4/8, then the peak, then decayed once 12 images are done
    trained = json.loads((out / "config.json").read_text())["train"]
    lrs = [r["lr"] for r in records if r["event"] == "step"]
    gamma = trained["lr_gamma"]
    assert lrs == pytest.approx([trained["lr"] * f for f in (0.5, 1.0, 1.0, gamma, gamma, gamma)], rel=1e-12)
    assert [r["rank"] for r in records[0]["ranks"]] == [0, 1]
    assert records[0]["activation_checkpointing"] == "all" and records[0]["attention"] == "sdpa"
    assert [r["local_rank"] for r in records[0]["ranks"]] == [0, 1]


def test_checkpoints_hold_the_trainable_weights_and_refuse_other_frozen_ones(runs):
    """The engine files hold the LoRA weights and no frozen SAM weight; meta.json names the frozen
    weights by digest, the ZeRO stage and the precision, and a relaunch whose config builds other
    frozen weights, or asks for another ZeRO stage group, is refused before any step."""
    step_dir = runs["base"] / "straight" / "checkpoints" / "step_00000006"
    from resam_dist.model.build import build_sam
    from resam_dist.model.lora import apply_lora

    module = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")["module"]
    sam = build_sam("tiny", seed=0)
    apply_lora(sam, rank=4, alpha=4.0, dropout=0.0, start_block=0, seed=0)  # (configs/demo.json's lora section)
    frozen = {f"sam.{name}" for name, parameter in sam.named_parameters() if not parameter.requires_grad}
    trainable = {f"sam.{name}" for name, parameter in sam.named_parameters() if parameter.requires_grad}
    assert trainable <= module.keys() and not frozen & module.keys()
    digest = json.loads((step_dir / "meta.json").read_text())["frozen_weights_sha256"]
    assert len(digest) == 64
    reseeded = runs["reseeded"]
    assert reseeded.returncode != 0
    assert f"was trained over other frozen SAM weights (digest {digest[:12]})" in reseeded.stdout, \
        reseeded.stdout[-3000:]
    meta = json.loads((step_dir / "meta.json").read_text())
    assert (meta["zero_stage"], meta["bf16"]) == (2, False)
    trained = json.loads((step_dir.parents[1] / "config.json").read_text())["train"]
    assert (meta["train.lr"], meta["train.weight_decay"], meta["train.grad_clip"]) == (
        trained["lr"], trained["weight_decay"], trained["grad_clip"])
    assert sorted(meta["data_order"]) == ["data.seed", "data.shuffle", "data.shuffle_buffer", "shards_sha256",
                                          "train.images_per_rank"]
    restaged = runs["restaged"]
    assert restaged.returncode != 0
    assert "was written with ZeRO stage 2, " in restaged.stdout and "asks for stage 0" in restaged.stdout, \
        restaged.stdout[-3000:]
    assert step_losses(runs["base"] / "straight" / "train_log.jsonl").keys() == set(range(1, 2 * K + 1))
    assert (runs["base"] / "straight" / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_a_relaunch_with_another_lr_applies_it_from_the_resumed_step(runs):
    """DeepSpeed restores the checkpoint's peak lr (and, in ZeRO 2, gradient clipping); the trainer
    sets the config's over them and says so."""
    relr = runs["relr"]
    assert relr.returncode == 0, relr.stdout[-4000:]
    old, new = runs["trained_lr"], runs["trained_lr"] / 10
    trained_clip = json.loads((runs["base"] / "straight" / "config.json").read_text())["train"]["grad_clip"]
    assert f"with train.lr {old} -> {new}, train.grad_clip {trained_clip} -> 0.5, train.warmup_steps 8 -> 4 (" \
        in relr.stdout, relr.stdout[-3000:]  # (a shorter warm-up, long over by step 7: the lr of the test below)
    straight = {r["step"]: r["lr"] for r in read_jsonl(runs["base"] / "straight" / "train_log.jsonl")
                if r["event"] == "step"}
    relaunched = {r["step"]: r["lr"] for r in read_jsonl(runs["base"] / "relr" / "train_log.jsonl")
                  if r["event"] == "step"}
    # steps 6 and 7 both run past the warm-up (8 images) and the milestone (12): the same factor
    assert relaunched[2 * K + 1] == pytest.approx(straight[2 * K] / 10, rel=1e-12)


def test_a_dead_rank_ends_the_job_with_a_message(runs):
    assert runs["survivor_rc"] is not None, (f"rank 0 still ran {TIMEOUT_S + 60} s after rank 1 was killed:\n"
                                             + runs["survivor_log"][-3000:])
    assert runs["survivor_rc"] != 0
    assert runs["survivor_seconds"] < TIMEOUT_S + 60
    assert "training stopped: a collective failed" in runs["survivor_log"], runs["survivor_log"][-3000:]


def test_relaunch_resumes_from_latest_and_reproduces_the_losses_bitwise(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stdout[-4000:]
    log_path = runs["base"] / "killed" / "train_log.jsonl"
    starts = [r for r in read_jsonl(log_path) if r["event"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, "step_00000003"]
    assert starts[1]["step"] == K and starts[1]["data_position"] == K * 2
    straight = step_losses(runs["base"] / "straight" / "train_log.jsonl")
    resumed = step_losses(log_path)
    assert sorted(straight) == list(range(1, 2 * K + 1))
    assert {step: resumed[step] for step in straight} == straight  # exact float equality
    # the final trainer state matches too: queue and LoRA weights, bit for bit
    for name in ("client_rank00000.pt", "client_rank00001.pt"):
        a = torch.load(runs["base"] / "straight" / "checkpoints" / "step_00000006" / name, weights_only=False)
        b = torch.load(runs["base"] / "killed" / "checkpoints" / "step_00000006" / name, weights_only=False)
        assert torch.equal(a["step_state"]["entries"], b["step_state"]["entries"])
        assert a["guard"] == b["guard"]
    from safetensors.torch import load_file
    lora_a = load_file(runs["base"] / "straight" / "export" / "adapter" / "adapter_model.safetensors")
    lora_b = load_file(runs["base"] / "killed" / "export" / "adapter" / "adapter_model.safetensors")
    assert lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
