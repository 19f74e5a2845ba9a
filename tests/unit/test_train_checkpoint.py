"""Atomic checkpoint protocol (one process; the multi-rank path runs in tests/distributed)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from resam_dist.train.checkpoint import (LATEST, CheckpointManager, atomic_write_text, capture_rng_state,
                                         changed_optimizer_settings, changed_schedule_settings, check_data_order,
                                         check_engine_layout,
                                         check_frozen_weights, files_to_sync,
                                         frozen_weights_digest, load_trainable_state, restore_rng_state,
                                         tag_for_step)


def _engine_writer(payload: str):
    def write(root, tag):
        (root / tag).mkdir(parents=True, exist_ok=True)
        (root / tag / "engine.txt").write_text(payload)
    return write


def test_save_keeps_last_and_points_latest_at_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, rank=0, world_size=1)
    manager.prepare()
    assert manager.latest_tag() is None
    for step in (2, 4, 6):
        tag = manager.save(step, write_engine=_engine_writer(f"engine {step}"),
                           client_state={"step": step, "queue": torch.arange(3.0) * step}, meta={"zero_stage": 2})
        assert tag == tag_for_step(step)
    assert manager.tags() == [tag_for_step(4), tag_for_step(6)]
    assert manager.latest_tag() == tag_for_step(6)
    assert (manager.root / LATEST).read_text().strip() == "step_00000006"
    assert (manager.root / "step_00000006" / "engine.txt").read_text() == "engine 6"
    meta = manager.read_meta("step_00000006")
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["zero_stage"] == 2
    client = manager.load_client_state("step_00000006")
    assert client["step"] == 6 and torch.equal(client["queue"], torch.tensor([0.0, 6.0, 12.0]))
    assert not list(manager.root.glob(".tmp-*"))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    manager.prepare()
    manager.save(1, write_engine=_engine_writer("one"), client_state={"step": 1}, meta={})

    def crash(root, tag):
        _engine_writer("half")(root, tag)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        manager.save(2, write_engine=crash, client_state={"step": 2}, meta={})
    assert (tmp_path / ".tmp-step_00000002").is_dir()          # the partial write stays invisible
    assert manager.latest_tag() == "step_00000001"
    assert manager.tags() == ["step_00000001"]
    manager.prepare()                                           # the next start clears it
    assert not (tmp_path / ".tmp-step_00000002").exists()
    # a directory renamed but never made `latest` is replaced when that step is saved again
    (tmp_path / "step_00000002").mkdir()
    manager.save(2, write_engine=_engine_writer("two"), client_state={"step": 2}, meta={})
    assert manager.latest_tag() == "step_00000002"
    assert (tmp_path / "step_00000002" / "engine.txt").read_text() == "two"


def test_resume_with_another_world_size_is_refused(tmp_path):
    CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1).save(
        3, write_engine=_engine_writer("x"), client_state={"step": 3}, meta={})
    other = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=4)
    with pytest.raises(ValueError, match="written by 1 ranks, this run has 4"):
        other.load_client_state(other.latest_tag())


def test_latest_naming_a_missing_checkpoint_is_a_clear_error(tmp_path):
    atomic_write_text(tmp_path / LATEST, "step_00000009\n")
    with pytest.raises(ValueError, match="step_00000009"):
        CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1).latest_tag()


def test_latest_naming_a_replaced_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    for step in (1, 2):
        manager.save(step, write_engine=_engine_writer(str(step)), client_state={"step": step}, meta={})
    # a crash after `step_00000002` was moved aside for a rewrite, before the new one was renamed in
    (tmp_path / "step_00000002").rename(tmp_path / ".tmp-stale_step_00000002")
    assert manager.latest_tag() == "step_00000001"
    assert manager.load_client_state("step_00000001")["step"] == 1
    # the next start puts the complete checkpoint back under its tag
    manager.prepare()
    assert manager.latest_tag() == "step_00000002" and manager.load_client_state("step_00000002")["step"] == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_kill_between_the_rename_and_latest_resumes_from_the_renamed_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    manager.prepare()
    manager.save(1, write_engine=_engine_writer("1"), client_state={"step": 1}, meta={})
    (tmp_path / LATEST).unlink()  # the first checkpoint: renamed into place, `latest` never written
    assert manager.latest_tag() == "step_00000001"
    manager.save(2, write_engine=_engine_writer("2"), client_state={"step": 2}, meta={})
    atomic_write_text(tmp_path / LATEST, "step_00000001\n")  # a later one: `latest` one behind
    assert manager.latest_tag() == "step_00000002"


def test_a_kill_between_the_two_renames_of_a_rewrite_keeps_the_newer_attempt(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0, world_size=1)
    manager.prepare()
    for step in (1, 2):
        manager.save(step, write_engine=_engine_writer(f"first {step}"), client_state={"step": step}, meta={})
    # step 2 saved again: the new attempt complete in .tmp-step_00000002, the old one moved aside,
    # killed before the new one was renamed in
    rewrite = CheckpointManager(tmp_path / "scratch", keep_last=3, rank=0, world_size=1)
    rewrite.prepare()
    rewrite.save(2, write_engine=_engine_writer("second 2"), client_state={"step": 2}, meta={})
    (tmp_path / "step_00000002").rename(tmp_path / ".tmp-stale_step_00000002")
    (tmp_path / "scratch" / "step_00000002").rename(tmp_path / ".tmp-step_00000002")
    manager.prepare()
    assert manager.latest_tag() == "step_00000002"
    assert (tmp_path / "step_00000002" / "engine.txt").read_text() == "second 2"
    assert not list(tmp_path.glob(".tmp-*"))


def test_rng_states_round_trip_through_a_file(tmp_path):
    state = capture_rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False), torch.device("cpu"))
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_atomic_write_replaces_whole_content(tmp_path):
    target = tmp_path / "pointer"
    atomic_write_text(target, "a" * 1000)
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pointer"]


def lora_sam(seed: int = 0):
    from resam_dist.model.build import build_sam
    from resam_dist.model.lora import apply_lora

    sam = build_sam("tiny", seed=seed)
    apply_lora(sam, rank=4, alpha=4.0, dropout=0.0, start_block=0, seed=1)
    return sam


def test_the_frozen_weights_digest_names_the_frozen_weights_only():
    sam = lora_sam()
    digest = frozen_weights_digest(sam)
    assert digest == frozen_weights_digest(lora_sam()) and len(digest) == 64
    assert digest != frozen_weights_digest(lora_sam(seed=1))  # another random base
    with torch.no_grad():
        next(p for n, p in sam.named_parameters() if "lora_" in n).add_(1.0)
    assert frozen_weights_digest(sam) == digest  # the trainable weights are not part of it
    with torch.no_grad():
        next(p for p in sam.parameters() if not p.requires_grad).view(-1)[-1] += 1e-6
    assert frozen_weights_digest(sam) != digest


def test_a_resume_over_other_frozen_weights_is_refused():
    check_frozen_weights({"step": 4}, "a" * 64, source="checkpoint x")  # written whole: no digest, no check
    check_frozen_weights({"frozen_weights_sha256": "a" * 64}, "a" * 64, source="checkpoint x")
    with pytest.raises(ValueError, match=r"checkpoint x was trained over other frozen SAM weights \(digest "
                                         r"aaaaaaaaaaaa\) than the config's model section builds \(bbbbbbbbbbbb\)"):
        check_frozen_weights({"frozen_weights_sha256": "a" * 64}, "b" * 64, source="checkpoint x")


def test_a_resume_across_zero_stage_groups_or_precisions_is_refused():
    layout = dict(source="checkpoint x", config="run.json")
    check_engine_layout({"step": 4}, zero_stage=3, bf16=True, **layout)  # no record: not checked
    for saved, wanted in ((0, 0), (1, 2), (2, 1), (3, 3)):  # within a group DeepSpeed loads it
        check_engine_layout({"zero_stage": saved, "bf16": True}, zero_stage=wanted, bf16=True, **layout)
    for saved, wanted in ((2, 0), (0, 1), (2, 3), (3, 1)):
        with pytest.raises(ValueError, match=rf"checkpoint x was written with ZeRO stage {saved}, run.json asks "
                                             rf"for stage {wanted} \(deepspeed.zero_optimization.stage\)"):
            check_engine_layout({"zero_stage": saved, "bf16": False}, zero_stage=wanted, bf16=False, **layout)
    with pytest.raises(ValueError, match=r"checkpoint x was written in fp32, run.json trains in bf16 "
                                         r"\(train.precision, resolved\)"):
        check_engine_layout({"zero_stage": 2, "bf16": False}, zero_stage=2, bf16=True, **layout)


def test_a_resume_names_a_changed_lr_or_weight_decay():
    """DeepSpeed restores the checkpoint's optimizer values; the trainer applies the config's and
    says what changed."""
    settings = dict(lr=1e-3, weight_decay=1e-4, grad_clip=1.0)
    assert changed_optimizer_settings({"step": 4}, **settings) == []  # no record: nothing to say
    assert changed_optimizer_settings({"train.lr": 1e-3, "train.weight_decay": 1e-4}, **settings) == []
    assert changed_optimizer_settings({"train.lr": 1e-2, "train.weight_decay": 0.5, "train.grad_clip": 0.0},
                                      **settings) == ["train.lr 0.01 -> 0.001", "train.weight_decay 0.5 -> 0.0001",
                                                      "train.grad_clip 0.0 -> 1.0"]


def test_a_resume_names_a_changed_schedule():
    """The factor is rebuilt from the config at the restored step: a changed unit, global batch,
    warm-up, milestones or gamma moves the lr at once, and is said. A checkpoint without a record
    of the unit counted optimizer steps."""
    schedule = {"train.schedule_unit": "images", "schedule_images_per_step": 64, "train.warmup_steps": 250,
                "train.milestones": [2000, 4000], "train.lr_gamma": 0.1}
    assert changed_schedule_settings(dict(schedule), schedule) == []
    assert changed_schedule_settings({"step": 100, "train.lr": 5e-4}, schedule) == [
        "train.schedule_unit steps -> images", "the schedule's images per step 1 -> 64"]
    assert changed_schedule_settings({**schedule, "schedule_images_per_step": 32, "train.milestones": [2000]},
                                     schedule) == ["the schedule's images per step 32 -> 64",
                                                   "train.milestones [2000] -> [2000, 4000]"]


def test_a_resume_over_another_data_order_is_refused_naming_what_changed():
    """The data position counts batch slots of one data order: other shards, seeds, shuffling or
    batch sizes would resume at other samples."""
    order = {"shards_sha256": "a" * 64, "data.seed": 0, "data.shuffle": True, "data.shuffle_buffer": 256,
             "train.images_per_rank": 2}
    check_data_order({"step": 4}, order, source="checkpoint x", config="run.json")  # no record: not checked
    check_data_order({"data_order": dict(order)}, order, source="checkpoint x", config="run.json")
    with pytest.raises(ValueError, match=r"checkpoint x was written over another data order than run.json gives "
                                         r"\(data.seed 0 -> 3; train.images_per_rank 2 -> 4\)"):
        check_data_order({"data_order": order}, {**order, "data.seed": 3, "train.images_per_rank": 4},
                         source="checkpoint x", config="run.json")
    with pytest.raises(ValueError, match=r"shards_sha256 'aaaa"):
        check_data_order({"data_order": order}, {**order, "shards_sha256": "b" * 64}, source="checkpoint x",
                         config="run.json")


def test_a_trainable_state_loads_and_leaves_the_frozen_weights_alone():
    source, target = lora_sam(), lora_sam(seed=1)
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn_like(parameter))
    frozen_before = {n: p.clone() for n, p in target.named_parameters() if not p.requires_grad}
    state = {n: p.detach().clone() for n, p in source.named_parameters() if p.requires_grad}
    load_trainable_state(state, target, origin="checkpoint x")
    trained = dict(target.named_parameters())
    assert all(torch.equal(trained[name], value) for name, value in state.items())
    assert all(torch.equal(trained[name], value) for name, value in frozen_before.items())

    lora_name = next(iter(state))
    with pytest.raises(ValueError, match=rf"checkpoint x: .*trainable weights missing: \['{lora_name}'\]"):
        load_trainable_state({k: v for k, v in state.items() if k != lora_name}, target, origin="checkpoint x")
    with pytest.raises(ValueError, match=r"unknown keys: \['extra.weight'\]"):
        load_trainable_state({**state, "extra.weight": torch.zeros(1)}, target, origin="checkpoint x")
    wider = {**state, lora_name: torch.zeros(state[lora_name].shape[0] + 1, *state[lora_name].shape[1:])}
    with pytest.raises(ValueError, match=rf"checkpoint x: 1 weight\(s\) have another shape than the model's, "
                                         rf"e.g. \['{lora_name} \("):
        load_trainable_state(wider, target, origin="checkpoint x")


def test_each_rank_fsyncs_its_own_files_and_the_unnamed_ones():
    names = ["mp_rank_00_model_states.pt", "client_rank00000.pt", "client_rank00001.pt", "client_rank00010.pt",
             "zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero_pp_rank_10_mp_rank_00_model_states.pt", "unknown.bin"]
    paths = [Path("ckpt") / name for name in names]
    chosen = {rank: [path.name for path in files_to_sync(paths, rank)] for rank in (0, 1, 10)}
    assert chosen[0] == ["mp_rank_00_model_states.pt", "client_rank00000.pt",
                         "zero_pp_rank_0_mp_rank_00_optim_states.pt", "unknown.bin"]
    assert chosen[1] == ["mp_rank_00_model_states.pt", "client_rank00001.pt",
                         "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "unknown.bin"]
    assert chosen[10] == ["mp_rank_00_model_states.pt", "client_rank00010.pt",
                          "zero_pp_rank_10_mp_rank_00_model_states.pt", "unknown.bin"]
    assert set().union(*chosen.values()) == set(names)  # every file is fsynced by some rank
