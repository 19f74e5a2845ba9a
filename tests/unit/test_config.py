"""Strict typed configs: every shipped config loads; bad keys, types and batch sizes are refused."""

import json
import math
import os
from pathlib import Path

import pytest

from resam_dist.config import deepspeed_dict, load_config
from resam_dist.train.schedule import lr_factor, schedule_warnings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


def demo_dict() -> dict:
    return json.loads((CONFIGS / "demo.json").read_text())


@pytest.mark.parametrize("name", ["nwpu", "whu", "hrsid", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.json")
    assert cfg.source.endswith(f"{name}.json")
    ds = deepspeed_dict(cfg, world_size=4, bf16_supported=True)
    assert ds["train_batch_size"] == cfg.train.images_per_rank * cfg.train.grad_accum_steps * 4
    assert ds["bf16"]["enabled"] is (cfg.train.precision in ("auto", "bf16"))


def test_dataset_configs_carry_spec_values():
    expected = {"nwpu": (6, [2000, 4000]), "whu": (1, [8000, 15000]), "hrsid": (1, [1500, 2000])}
    for name, (start_block, milestones) in expected.items():
        cfg = load_config(CONFIGS / f"{name}.json")
        assert cfg.lora.start_block == start_block
        assert cfg.train.milestones == milestones
        assert cfg.train.lr == 5e-4 and cfg.train.warmup_steps == 250
        assert cfg.train.schedule_unit == "images"  # the public code's batch-1 schedule, at any global batch
        assert cfg.lora.rank == 4 and cfg.data.max_instances == 50
        assert cfg.resam.ssa_weight == 0.1 and cfg.resam.ssa_tau == 0.07 and cfg.resam.queue_size == 128


# training images of SPEC.md's splits (tiling only adds samples) and the epochs they train
SPLIT_IMAGES = {"nwpu": 520, "whu": 4736, "hrsid": 459}


@pytest.mark.parametrize("name", sorted(SPLIT_IMAGES))
@pytest.mark.parametrize("world_size", [1, 8, 16, 64])
def test_dataset_schedules_warm_up_and_decay_at_every_cluster_size(name, world_size):
    """With 8 images per rank, milestones counted in optimizer steps (the public code's, written
    for batch 1) would never fire; counted in images, every run reaches its peak and decays."""
    cfg = load_config(CONFIGS / f"{name}.json")
    per_rank = math.ceil(SPLIT_IMAGES[name] / world_size)
    total_steps = cfg.train.epochs * math.ceil(per_rank / cfg.train.images_per_rank) // cfg.train.grad_accum_steps
    images_per_step = cfg.train.images_per_rank * world_size * cfg.train.grad_accum_steps
    assert schedule_warnings(total_steps=total_steps, warmup_steps=cfg.train.warmup_steps,
                             milestones=cfg.train.milestones, images_per_step=images_per_step,
                             unit=cfg.train.schedule_unit) == []
    factors = [lr_factor(step, warmup_steps=cfg.train.warmup_steps, milestones=cfg.train.milestones,
                         gamma=cfg.train.lr_gamma, images_per_step=images_per_step) for step in range(total_steps)]
    assert max(factors) == 1.0 and factors[-1] == pytest.approx(cfg.train.lr_gamma ** len(cfg.train.milestones))
    # the same schedule in optimizer steps misses both milestones at 8 ranks and more
    if world_size >= 8:
        assert schedule_warnings(total_steps=total_steps, warmup_steps=cfg.train.warmup_steps,
                                 milestones=cfg.train.milestones, images_per_step=1, unit="steps")


def test_unknown_key_names_key_and_file(tmp_path):
    data = demo_dict()
    data["train"]["learning_rate"] = 1e-3
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=r"run\.json.*unknown key 'train\.learning_rate'"):
        load_config(path)


def test_unknown_section(tmp_path):
    data = demo_dict()
    data["optimiser"] = {}
    with pytest.raises(ValueError, match="unknown key 'optimiser'"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", "fast"), ("train", "images_per_rank", 2.5), ("train", "images_per_rank", True),
    ("kernels", "enabled", 1), ("resam", "overlap_mode", "max"), ("train", "milestones", [1, "2"]),
    ("model", "name", "vit_x"), ("train", "schedule_unit", "epochs"),
])
def test_wrong_types_name_the_key(tmp_path, section, key, value):
    data = demo_dict()
    data[section][key] = value
    with pytest.raises(ValueError, match=rf"run\.json.*'{section}\.{key}"):
        load_config(write(tmp_path, data))


def test_int_accepted_for_float(tmp_path):
    data = demo_dict()
    data["train"]["lr"] = 1
    assert load_config(write(tmp_path, data)).train.lr == 1.0


def test_inconsistent_batch_sizes(tmp_path):
    data = demo_dict()
    data["deepspeed"]["train_micro_batch_size_per_gpu"] = 7
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        load_config(write(tmp_path, data))
    data = demo_dict()
    data["deepspeed"]["train_batch_size"] = 5
    cfg = load_config(write(tmp_path, data))
    with pytest.raises(ValueError, match="train_batch_size"):
        deepspeed_dict(cfg, world_size=2, bf16_supported=False)


def test_auto_keys_filled(tmp_path):
    cfg = load_config(CONFIGS / "demo.json")
    ds = deepspeed_dict(cfg, world_size=2, bf16_supported=False)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.images_per_rank
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum_steps
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)


def test_bad_values(tmp_path):
    for section, key, value, pattern in [("data", "num_points", 4, "data.num_points"),
                                         ("train", "milestones", [5, 2], "milestones"),
                                         ("resam", "entropy_eps", 1.5, "entropy_eps")]:
        data = demo_dict()
        data[section][key] = value
        with pytest.raises(ValueError, match=pattern):
            load_config(write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_config(bad)


def test_overrides_and_relative_paths(tmp_path, monkeypatch):
    # a relative path written in the file resolves against the file's folder ...
    data = demo_dict()
    data["model"]["checkpoint"] = "weights/ck.pth"
    data["data"]["train_shards"] = "shards"
    cfg = load_config(write(tmp_path, data))
    assert cfg.model.checkpoint == str(tmp_path / "weights" / "ck.pth")
    assert cfg.data.train_shards == str(tmp_path / "shards")
    # ... one given as an override (--set) against the working directory, as a shell user expects
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "demo.json", {"train.max_steps": 3, "model.checkpoint": "cache/ck.pth"})
    assert cfg.train.max_steps == 3
    assert cfg.model.checkpoint == str(tmp_path / "cache" / "ck.pth")
    # (the file's own relative paths still resolve against configs/)
    assert cfg.data.train_shards == os.path.normpath(CONFIGS / demo_dict()["data"]["train_shards"])
    with pytest.raises(ValueError, match="unknown key 'train.maxsteps'"):
        load_config(CONFIGS / "demo.json", {"train.maxsteps": 3})


@pytest.mark.parametrize("section,key,value,pattern", [
    ("train", "lr", 0, "train.lr' must be positive"),
    ("train", "max_steps", -1, "train.max_steps' must be >= 0"),
    ("checkpoint", "keep_last", 0, "checkpoint.keep_last' must be positive"),
    ("resam", "ssa_tau", 0.0, "resam.ssa_tau' must be positive"),
    ("metrics", "base_port", 70000, "metrics.base_port"),
    ("resam", "queue_size", -1, "resam.queue_size' must be >= 0, got -1"),
    ("train", "milestones", [100, 100], "train.milestones' must be strictly increasing"),
    ("lora", "dropout", 1.0, r"lora.dropout' must be in \[0, 1\)"),
    ("lora", "start_block", 6, r"lora.start_block' must be in \[0, 5\] for model 'tiny' \(6 encoder blocks\)"),
    ("data", "reader_threads", 0, "data.reader_threads' must be positive"),
    ("data", "prefetch_batches", 0, "data.prefetch_batches' must be positive"),
    ("data", "shuffle_buffer", 0, "data.shuffle_buffer' must be positive"),
    ("eval", "seed", -1, "eval.seed' must be >= 0"),
    ("data", "seed", -3, "data.seed' must be >= 0"),
    ("resam", "pointsam_store_size", 2, "resam.pointsam_store_size' must be >= 3"),
    ("resam", "pointsam_cluster_every", 0, "resam.pointsam_cluster_every' must be positive"),
    ("resam", "pointsam_overlap_iou", 1.5, "resam.pointsam_overlap_iou' must be in"),
    ("resam", "teacher_ema", 1.0, r"resam.teacher_ema' must be in \[0, 1\) \(0: no EMA teacher\), got 1.0"),
    ("resam", "teacher_ema", -0.1, r"resam.teacher_ema' must be in \[0, 1\)"),
    ("train", "lr_gamma", -0.1, r"train.lr_gamma' must be in \(0, 1\]"),
    ("train", "lr_gamma", 0, r"train.lr_gamma' must be in \(0, 1\]"),
    ("train", "milestones", [-5], r"train.milestones' must hold counts >= 1 \(optimizer steps or images: "
                                  r"train.schedule_unit\), got \[-5\]"),
    ("lora", "alpha", 0, "lora.alpha' must be positive"),
    ("resam", "focal_weight", -20, "resam.focal_weight' must be >= 0"),
    ("resam", "loss_spike_factor", 1.0, "resam.loss_spike_factor' must be above 1"),
    ("resam", "loss_spike_factor", 0.9, "resam.loss_spike_factor' must be above 1"),
    ("train", "seed", 2**63, r"train.seed' must be below 2\*\*63"),
    ("data", "seed", 2**64, r"data.seed' must be below 2\*\*63"),
    ("train", "output_dir", "", "train.output_dir' is empty"),
    ("model", "checkpoint", "", "model.checkpoint' is empty; use null"),
    ("train", "lr", 10**400, "train.lr' must be"),
])
def test_out_of_range_values(tmp_path, section, key, value, pattern):
    data = demo_dict()
    assert data["model"]["name"] == "tiny"  # (the start_block case's depth)
    data[section][key] = value
    with pytest.raises(ValueError, match=pattern) as raised:
        load_config(write(tmp_path, data))
    assert str(raised.value).startswith(str(tmp_path / "run.json"))  # the message names the file


def test_config_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    for overrides in (None, {"train.max_steps": 3}):
        with pytest.raises(ValueError, match="list.json: the config must be a JSON object, got list"):
            load_config(path, overrides)


def test_nothing_to_train_and_nan_are_refused(tmp_path):
    data = demo_dict()
    data["train"].update({"epochs": 0, "max_steps": 0})
    with pytest.raises(ValueError, match="nothing would be trained"):
        load_config(write(tmp_path, data))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(demo_dict()).replace('"lr": 0.001', '"lr": NaN'))
    with pytest.raises(ValueError, match="'train.lr'"):
        load_config(path)


@pytest.mark.parametrize("block,pattern", [
    ({"bf16": {"enabled": True}}, "contradicts 'train.precision'"),
    ({"fp16": {"enabled": "auto"}}, "fp16 is not supported"),
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "'deepspeed.torch_autocast.dtype' must be bf"),
    ({"torch_autocast": {"enabled": True, "dtype": "half"}}, r"torch_autocast.dtype' must be .*, got 'half'"),
    ({"torch_autocast": {"enabled": True}}, r"'deepspeed.torch_autocast.dtype' must be .*, got None"),
    ({"torch_autocast": True}, "'deepspeed.torch_autocast' must be an object"),
    ({"gradient_clipping": 5.0}, "gradient_clipping"),
    ({"zero_optimization": 2}, "'deepspeed.zero_optimization' must be an object"),
    ({"checkpoint": True}, "'deepspeed.checkpoint' must be an object"),
    ({"checkpoint": {"writer": {"decoupled": True}}}, "'deepspeed.checkpoint.writer.decoupled' is not supported"),
    ({"datastates_ckpt": {"enabled": False}}, "'deepspeed.datastates_ckpt' is not supported"),
    ({"bf16": {"enabled": 1}}, r"'deepspeed.bf16.enabled' must be true, false or \"auto\", got 1"),
    ({"train_micro_batch_size_per_gpu": True}, "'deepspeed.train_micro_batch_size_per_gpu' must be an integer"),
    ({"train_batch_size": 4.0}, "'deepspeed.train_batch_size' must be an integer"),
    ({"gradient_clipping": True}, "'deepspeed.gradient_clipping' must be a number"),
    ({"zero_optimization": {"stage": True}}, "'deepspeed.zero_optimization.stage' must be 0-3, got True"),
    ({"bfloat16": {"enabled": True}}, "'deepspeed.bfloat16' would be ignored; use 'deepspeed.bf16'"),
    ({"zero_optimisation": {"stage": 2}},
     r"unknown key 'deepspeed.zero_optimisation': DeepSpeed would ignore it \(did you mean "
     r"'deepspeed.zero_optimization'\?\)"),
])
def test_deepspeed_block_conflicts(tmp_path, block, pattern):
    data = demo_dict()
    data["train"]["precision"] = "fp32"
    data["deepspeed"].update(block)
    with pytest.raises(ValueError, match=pattern):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("autocast", [{"enabled": True, "dtype": "bfloat16"},
                                      {"enabled": True, "dtype": "torch.float32"},
                                      {"enabled": False, "dtype": "fp16"}])
def test_torch_autocast_in_bf16_or_fp32_or_off_is_accepted(tmp_path, autocast):
    data = demo_dict()
    data["deepspeed"]["torch_autocast"] = autocast
    assert load_config(write(tmp_path, data)).deepspeed["torch_autocast"] == autocast


def test_override_through_a_value_is_refused():
    with pytest.raises(ValueError, match="'lr' is not a section"):
        load_config(CONFIGS / "demo.json", {"train.lr.x": 1})


def test_ema_teacher_needs_a_teacher_and_zero_stage_0_to_2(tmp_path):
    data = demo_dict()
    data["resam"]["teacher_ema"] = 0.99
    assert load_config(write(tmp_path, data)).resam.teacher_ema == 0.99
    data["resam"]["method"] = "supervised"
    with pytest.raises(ValueError, match="'resam.teacher_ema' needs a teacher: method 'resam' or 'selftrain', "
                                         "got 'supervised'"):
        load_config(write(tmp_path, data))
    data["resam"]["method"] = "selftrain"
    data["deepspeed"]["zero_optimization"]["stage"] = 3
    data["train"]["activation_checkpointing"] = "off"
    with pytest.raises(ValueError, match="'resam.teacher_ema' is not supported with ZeRO stage 3"):
        load_config(write(tmp_path, data))


def test_deepspeed_keys_cover_what_the_installed_deepspeed_reads():
    """DEEPSPEED_KEYS (the config's allow-list) holds every top-level key DeepSpeed's config reads,
    recorded while it parses a full block."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from resam_dist.config import DEEPSPEED_CHECKPOINT_KEYS, DEEPSPEED_KEYS

    class Recording(dict):
        read: set = set()

        def get(self, key, *default):
            self.read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

    class RecordingSection(Recording):
        read: set = set()

    block = Recording(deepspeed_dict(load_config(CONFIGS / "nwpu.json"), world_size=1, bf16_supported=False))
    block["checkpoint"] = RecordingSection()
    DeepSpeedConfig(block)
    assert len(block.read) > 40 and block.read <= DEEPSPEED_KEYS, sorted(block.read - DEEPSPEED_KEYS)
    # and every key of its checkpoint section
    assert RecordingSection.read == DEEPSPEED_CHECKPOINT_KEYS, sorted(RecordingSection.read ^ DEEPSPEED_CHECKPOINT_KEYS)


def test_a_misspelt_deepspeed_checkpoint_key_is_refused(tmp_path):
    data = demo_dict()
    data["deepspeed"]["checkpoint"] = {"tag_validaton": "FAIL"}
    with pytest.raises(ValueError, match=r"run\.json: unknown key 'deepspeed\.checkpoint\.tag_validaton': DeepSpeed "
                                         r"would ignore it \(did you mean 'deepspeed\.checkpoint\.tag_validation'\?\)"):
        load_config(write(tmp_path, data))
    data["deepspeed"]["checkpoint"] = {"tag_validation": "FAIL", "use_node_local_storage": False}
    assert load_config(write(tmp_path, data)).deepspeed["checkpoint"]["tag_validation"] == "FAIL"


def test_an_object_given_for_a_section_sets_its_keys_and_keeps_the_others(tmp_path, monkeypatch):
    file_cfg = load_config(CONFIGS / "demo.json")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "demo.json", {"train": {"max_steps": 3}, "model": {"checkpoint": "ck.pth"},
                                              "deepspeed": {"zero_optimization": {"stage": 1}}})
    assert cfg.train.max_steps == 3
    assert (cfg.train.lr, cfg.train.milestones, cfg.train.output_dir) == (
        file_cfg.train.lr, file_cfg.train.milestones, file_cfg.train.output_dir)
    assert cfg.model.checkpoint == str(tmp_path / "ck.pth")  # given on the command line: the working directory
    assert cfg.deepspeed["zero_optimization"]["stage"] == 1
    assert cfg.deepspeed["bf16"] == file_cfg.deepspeed["bf16"]


def test_bf16_asked_for_explicitly_on_a_device_without_it_is_refused(tmp_path):
    data = demo_dict()
    data["train"]["precision"] = "auto"
    data["deepspeed"]["bf16"] = {"enabled": True}
    cfg = load_config(write(tmp_path, data))
    assert deepspeed_dict(cfg, world_size=1, bf16_supported=True)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="'deepspeed.bf16.enabled' is true but this device does not support bf16"):
        deepspeed_dict(cfg, world_size=1, bf16_supported=False)


def test_repeated_keys_and_non_utf8_files_are_refused_by_name(tmp_path):
    # json.loads keeps the last of a repeated key: the first "train" section would vanish silently
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(demo_dict())[:-1] + ', "train": {"max_steps": 5}}')
    with pytest.raises(ValueError, match=r"twice.json: key 'train' appears twice in one object"):
        load_config(path)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(demo_dict()).replace('"lr": 0.001', '"lr": 0.001, "lr": 0.1'))
    with pytest.raises(ValueError, match=r"nested.json: key 'lr' appears twice"):
        load_config(nested)
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(demo_dict()).replace('"tiny"', '"t\xefny"').encode("latin-1"))
    with pytest.raises(ValueError, match="latin.json: not UTF-8 text"):
        load_config(latin)


def test_the_last_set_of_a_key_wins_and_errors_name_the_set_keys(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_entry", CONFIGS.parent / "launch" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    overrides = entry.parse_overrides(["train.lr=0.1", 'train={"lr": 0.2}', "train.lr=0.3"])
    assert list(overrides) == ["train", "train.lr"]
    assert load_config(CONFIGS / "demo.json", overrides).train.lr == 0.3
    with pytest.raises(ValueError, match=r"demo.json with --set train.max_steps, train.lr: key 'train.lr' must be"):
        load_config(CONFIGS / "demo.json", entry.parse_overrides(["train.max_steps=3", "train.lr=NaN"]))
    with pytest.raises(ValueError, match=r"--set train: key 'lr' appears twice in one object"):
        entry.parse_overrides(['train={"lr": 0.1, "lr": 0.2}'])
