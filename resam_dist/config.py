"""One typed config per run: project sections plus the DeepSpeed block.

`load_config(path)` reads a JSON file into a `Config` dataclass tree. Keys are strict: an
unknown key, a key repeated in one object, a missing required key or a wrongly typed value
raises `ValueError` naming the key and the file (with the keys that `overrides` set). The
`"deepspeed"` block is kept as a dict for `deepspeed.initialize`; its `"auto"` batch keys are
filled from the `train` section by `deepspeed_dict(cfg, world_size)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shards: a folder holding `manifest.json` from resam-prep, or a brace pattern
    such as `data/nwpu/train-{000000..000007}.tar`. Relative paths resolve against the config file."""
    test_annotations: str = ""
    """COCO JSON of the evaluation split (relative to the config file)."""
    test_images: str = ""
    """Image folder of the evaluation split."""
    num_points: int = 1
    """Positive (and as many negative) point prompts per instance: 1, 2 or 3."""
    max_instances: int = 50
    """Instances per image per decoder chunk; more are processed in chunks."""
    reader_threads: int = 2
    """DALI CPU threads per rank."""
    prefetch_batches: int = 2
    """DALI prefetch queue depth."""
    shuffle: bool = True
    """Shuffle samples inside the reader (seeded)."""
    shuffle_buffer: int = 256
    """Encoded samples held per rank by the reader's shuffle buffer (DALI `initial_fill`)."""
    seed: int = 0
    """Seed of the data order and of the augmentations."""


@dataclass
class ModelConfig:
    name: Literal["tiny", "vit_b", "vit_l", "vit_h"] = "vit_b"
    """SAM variant from the registry in resam_dist/model/build.py."""
    checkpoint: str | None = None
    """Local path of a SAM checkpoint in the official key layout (None: random init)."""
    attention: Literal["sdpa", "official"] = "sdpa"
    """SAM's attention and LayerNorm layers: "sdpa" runs them fused (no N x N matrix; same
    parameters, results equal up to rounding): the encoder's attention with SAM's relative
    positions as a Triton flash attention on CUDA (augmented q/k vectors through
    scaled_dot_product_attention elsewhere), the mask decoder's attention through
    scaled_dot_product_attention, its LayerNorms (residual add, LayerNorm2d, upscaling bias and
    GELU) as one pass each and, on CUDA, its last upscaling stage and mask product as one Triton
    kernel (see resam_dist/model/attention.py); "official" is SAM's own code."""


@dataclass
class LoraConfig:
    rank: int = 4
    """LoRA rank."""
    alpha: float = 4.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout during training, in the student's and the teacher's passes (never at evaluation)."""
    start_block: int = 6
    """First image-encoder block whose attention `qkv` gets an adapter."""


@dataclass
class ResamConfig:
    method: Literal["resam", "selftrain", "supervised", "pointsam"] = "resam"
    """Training method: ReSAM; self-training only (no Refine/Requery/SSA); supervised on GT
    masks (upper bound); PointSAM-style (benchmark baseline)."""
    refine: bool = True
    """Apply Refine (entropy filter + overlap suppression)."""
    requery: bool = True
    """Apply Requery (box prompts from refined masks)."""
    entropy_eps: float = 0.5
    """Keep a pixel when p * (1 - H) > entropy_eps (0.5 public code, 0.2 paper)."""
    overlap_mode: Literal["drop", "argmax"] = "drop"
    """drop: a pixel kept by several instances leaves all of them; argmax: the most confident keeps it."""
    empty_policy: Literal["keep_point_mask", "drop"] = "keep_point_mask"
    """An instance whose refined mask is empty keeps its point-prompted mask, or is dropped."""
    focal_weight: float = 20.0
    """Weight of the focal term."""
    ssa_weight: float = 0.1
    """beta, the weight of the SSA term (0 turns SSA off)."""
    ssa_tau: float = 0.07
    """Temperature of the SSA soft targets."""
    queue_size: int = 128
    """FIFO queue length of weak-view instance embeddings."""
    teacher_ema: float = 0.0
    """0: the teacher is the student's current weights (SPEC default). In (0, 1): the teacher's
    passes run with an exponential moving average of the LoRA weights, updated after every
    optimizer step with this decay (methods resam and selftrain; ZeRO stage 0-2)."""
    loss_spike_factor: float = 4.0
    """Skip a step whose loss exceeds this factor times the running mean."""
    loss_window: int = 50
    """Number of recent losses in the running mean of the guard."""
    pointsam_store_size: int = 256
    """method "pointsam": FIFO length of the point-feature store (PointSAM uses 128-512)."""
    pointsam_cluster_every: int = 30
    """method "pointsam": iterations (accepted micro-batches: with train.grad_accum_steps > 1, several
    per optimizer step) between FINCH clusterings of the store into prototypes."""
    pointsam_target_images: int = 128
    """method "pointsam": the point features of this many first training images form the target prototypes."""
    pointsam_overlap_iou: float = 0.1
    """method "pointsam": Negative Prompt Calibration treats two instances as overlapping above this
    IoU of their teacher masks (each then takes the other's positive points as negatives)."""
    pointsam_proto_weight: float = 1.0
    """method "pointsam": weight of the prototype-based regularisation loss."""


@dataclass
class TrainConfig:
    images_per_rank: int = 1
    """Images per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 250
    """Linear warm-up length (optimizer steps, or images: `schedule_unit`)."""
    milestones: list[int] = field(default_factory=list)
    """Where the lr is multiplied by `lr_gamma`: optimizer steps, or images (`schedule_unit`)."""
    schedule_unit: Literal["steps", "images"] = "steps"
    """What `warmup_steps` and `milestones` count: optimizer steps, or training images (each
    optimizer step stands for images_per_rank x ranks x grad_accum_steps of them), so that a
    schedule written for one global batch, such as the public code's batch 1, holds at any
    cluster size."""
    lr_gamma: float = 0.1
    """LR decay factor at each milestone."""
    epochs: int = 10
    """Epochs over the training shards (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run `epochs`)."""
    grad_clip: float = 1.0
    """Gradient clipping norm (0: off)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 where the device supports it, else fp32."""
    seed: int = 42
    """Seed of the model's random initialisation (where no checkpoint gives the weights), of the
    LoRA initialisation and of each rank's torch / numpy random state (+ rank). The training
    prompts are drawn once, by `resam-prep --seed`."""
    output_dir: str = "runs/default"
    """Folder for logs, checkpoints and exports (relative to the working directory)."""
    log_every: int = 1
    """Console/JSON-lines log period in steps (rank 0 computes the monitoring IoUs of logged steps only)."""
    collective_timeout_s: int = 300
    """Timeout of collectives: a dead rank ends the job instead of hanging it."""
    activation_checkpointing: Literal["off", "encoder", "decoder", "all"] = "off"
    """Recompute instead of store, for less memory at the cost of extra forward work: "encoder"
    (each image-encoder block keeps only its input for the backward), "decoder" (each group of 32
    mask-decoder prompts, and the mask losses, likewise), "all" (both), "off". ZeRO 0-2."""


@dataclass
class EvalConfig:
    num_points: int = 1
    """Point prompts per instance at evaluation."""
    seed: int = 1337
    """Seed of the evaluation prompts."""
    batch_size: int = 4
    """Images per evaluation forward."""


@dataclass
class MetricsConfig:
    enabled: bool = True
    """Serve Prometheus metrics."""
    base_port: int = 9400
    """Rank r serves on base_port + local_rank (0: pick free ports)."""
    jsonl: bool = True
    """Write a JSON-lines log next to the checkpoints."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Checkpoint period in optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Number of checkpoints kept."""
    resume: bool = True
    """Resume from `latest` in output_dir when it exists."""


@dataclass
class KernelsConfig:
    enabled: bool = True
    """Use the Triton kernels (on CUDA; under TRITON_INTERPRET=1 on CPU), else the torch references."""


@dataclass
class FaultsConfig:
    """Fault injection for the test of the loss guard (off by default)."""

    nan_loss_step: int = 0
    """Multiply the loss of rank `nan_loss_rank` by NaN at the first micro-step of this optimizer
    step (1-based; 0: off). Fires once per process."""
    nan_loss_rank: int = 0
    """The rank whose loss `nan_loss_step` (and `nan_grad_step`) poisons."""
    nan_grad_step: int = 0
    """Make the gradient (not the loss) of rank `nan_loss_rank` NaN at the first micro-step of this
    optimizer step (1-based; 0: off): DeepSpeed then skips the update. Fires once per process."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    resam: ResamConfig = field(default_factory=ResamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Handed to deepspeed.initialize after `"auto"` keys are filled."""
    source: str = ""
    """The file this config was read from (set by load_config, not a JSON key)."""


_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
MAX_SEED = 2**63  # seeds stay below it: torch.manual_seed takes at most 2**64 - 1, and seeds get offsets added
# The top-level keys of a DeepSpeed config that DeepSpeed 0.19.8 (the pinned version) reads; it
# ignores any other, so a misspelt one would silently change nothing. Checked against the
# installed DeepSpeed by tests/unit/test_config.py.
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})
# The keys of its "checkpoint" section that DeepSpeed 0.19.8 reads (with dict.get: a misspelt one is
# ignored, e.g. tag_validation, which the trainer relies on, or use_node_local_storage, which it
# checks); its sections read through pydantic models (zero_optimization, bf16, ...) refuse unknown
# keys themselves, and the trainer names the config file then. Checked by tests/unit/test_config.py.
DEEPSPEED_CHECKPOINT_KEYS = frozenset({"tag_validation", "load_universal", "use_node_local_storage",
                                       "parallel_write", "writer", "checkpoint_serialization"})


def _check_value(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Return `value` converted to `annotation`, or raise ValueError naming key and file."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    bad = ValueError(f"{source}: key '{key}' must be {annotation!s}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_value(value, arg, key, source)
            except ValueError:
                continue
        raise bad
    if annotation is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in args:
            return value
        hint = (' (the former true/false are now "all"/"off")'
                if key == "train.activation_checkpointing" and isinstance(value, bool) else "")
        raise ValueError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_check_value(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                converted = float(value)  # OverflowError: an integer beyond float's range
            except OverflowError:
                raise bad from None
            if math.isfinite(converted):
                return converted
        raise bad
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: section '{prefix.rstrip('.')}' must be an object, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        if key not in fields:
            raise ValueError(f"{source}: unknown key '{prefix}{key}' (known: {sorted(fields)})")
    kwargs = {}
    for name, value in raw.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _check_value(value, annotation, f"{prefix}{name}", source)
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Cross-field checks; raise ValueError naming the key and the file."""
    src = cfg.source or "<config>"
    positive = {
        "data.num_points": cfg.data.num_points, "data.max_instances": cfg.data.max_instances,
        "train.images_per_rank": cfg.train.images_per_rank, "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "lora.rank": cfg.lora.rank, "eval.batch_size": cfg.eval.batch_size, "eval.num_points": cfg.eval.num_points,
        "data.reader_threads": cfg.data.reader_threads, "data.prefetch_batches": cfg.data.prefetch_batches,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "resam.pointsam_cluster_every": cfg.resam.pointsam_cluster_every,
        "resam.pointsam_target_images": cfg.resam.pointsam_target_images,
    }
    positive.update({
        "train.lr": cfg.train.lr, "resam.ssa_tau": cfg.resam.ssa_tau, "resam.loss_window": cfg.resam.loss_window,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "train.collective_timeout_s": cfg.train.collective_timeout_s, "lora.alpha": cfg.lora.alpha,
        "train.log_every": cfg.train.log_every,
    })
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"{src}: key '{key}' must be positive, got {value}")
    non_negative = {"train.epochs": cfg.train.epochs, "train.max_steps": cfg.train.max_steps,
                    "train.warmup_steps": cfg.train.warmup_steps, "train.grad_clip": cfg.train.grad_clip,
                    "train.weight_decay": cfg.train.weight_decay, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                    "lora.dropout": cfg.lora.dropout, "resam.ssa_weight": cfg.resam.ssa_weight,
                    "resam.focal_weight": cfg.resam.focal_weight,
                    "metrics.base_port": cfg.metrics.base_port, "resam.queue_size": cfg.resam.queue_size,
                    "resam.pointsam_proto_weight": cfg.resam.pointsam_proto_weight,
                    # numpy's generators take non-negative seeds only
                    "data.seed": cfg.data.seed, "train.seed": cfg.train.seed, "eval.seed": cfg.eval.seed,
                    "faults.nan_loss_step": cfg.faults.nan_loss_step, "faults.nan_loss_rank": cfg.faults.nan_loss_rank,
                    "faults.nan_grad_step": cfg.faults.nan_grad_step}
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{src}: key '{key}' must be >= 0, got {value}")
    for key, value in (("data.seed", cfg.data.seed), ("train.seed", cfg.train.seed), ("eval.seed", cfg.eval.seed)):
        if value >= MAX_SEED:
            raise ValueError(f"{src}: key '{key}' must be below 2**63, got {value}")
    if cfg.resam.loss_spike_factor <= 1.0:
        raise ValueError(f"{src}: key 'resam.loss_spike_factor' must be above 1 (a loss is skipped as a spike above "
                         f"this many times the recent mean; at 1 or below, ordinary losses would be), got "
                         f"{cfg.resam.loss_spike_factor}")
    if not cfg.train.output_dir:
        raise ValueError(f"{src}: key 'train.output_dir' is empty (it would write into the working directory)")
    if cfg.model.checkpoint == "":
        raise ValueError(f"{src}: key 'model.checkpoint' is empty; use null for a model without a checkpoint")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ValueError(f"{src}: keys 'train.epochs' and 'train.max_steps' are both 0: nothing would be trained")
    if cfg.metrics.base_port > 65535 - 256:
        raise ValueError(f"{src}: key 'metrics.base_port' must leave room for one port per local rank, got "
                         f"{cfg.metrics.base_port}")
    for key, value in (("data.num_points", cfg.data.num_points), ("eval.num_points", cfg.eval.num_points)):
        if value not in (1, 2, 3):
            raise ValueError(f"{src}: key '{key}' must be 1, 2 or 3, got {value}")
    if any(later <= earlier for earlier, later in zip(cfg.train.milestones, cfg.train.milestones[1:])):
        raise ValueError(f"{src}: key 'train.milestones' must be strictly increasing, got {cfg.train.milestones}")
    if cfg.train.milestones and cfg.train.milestones[0] < 1:
        raise ValueError(f"{src}: key 'train.milestones' must hold counts >= 1 (optimizer steps or images: "
                         f"train.schedule_unit), got {cfg.train.milestones}")
    if not 0.0 < cfg.train.lr_gamma <= 1.0:
        raise ValueError(f"{src}: key 'train.lr_gamma' must be in (0, 1] (the lr's factor at each milestone), got "
                         f"{cfg.train.lr_gamma}")
    if not 0.0 <= cfg.resam.entropy_eps < 1.0:
        raise ValueError(f"{src}: key 'resam.entropy_eps' must be in [0, 1), got {cfg.resam.entropy_eps}")
    if not 0.0 <= cfg.resam.teacher_ema < 1.0:
        raise ValueError(f"{src}: key 'resam.teacher_ema' must be in [0, 1) (0: no EMA teacher), got "
                         f"{cfg.resam.teacher_ema}")
    if cfg.resam.teacher_ema > 0 and cfg.resam.method not in ("resam", "selftrain"):
        raise ValueError(f"{src}: key 'resam.teacher_ema' needs a teacher: method 'resam' or 'selftrain', "
                         f"got '{cfg.resam.method}'")
    if cfg.lora.dropout >= 1.0:
        raise ValueError(f"{src}: key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    from resam_dist.model.build import SAM_REGISTRY  # the encoder depths; imported late (torch)

    depth = SAM_REGISTRY[cfg.model.name].encoder_depth
    if not 0 <= cfg.lora.start_block < depth:
        raise ValueError(f"{src}: key 'lora.start_block' must be in [0, {depth - 1}] for model '{cfg.model.name}' "
                         f"({depth} encoder blocks), got {cfg.lora.start_block}")
    from resam_dist.resam.pointsam import MIN_CLUSTER_POINTS

    if cfg.resam.pointsam_store_size < MIN_CLUSTER_POINTS:
        raise ValueError(f"{src}: key 'resam.pointsam_store_size' must be >= {MIN_CLUSTER_POINTS}, got "
                         f"{cfg.resam.pointsam_store_size}")
    if not 0.0 <= cfg.resam.pointsam_overlap_iou <= 1.0:
        raise ValueError(f"{src}: key 'resam.pointsam_overlap_iou' must be in [0, 1], got "
                         f"{cfg.resam.pointsam_overlap_iou}")
    ds = cfg.deepspeed
    checkpoint_keys = ds.get("checkpoint", {}) if isinstance(ds.get("checkpoint"), dict) else {}
    for prefix, keys, allowed in (("deepspeed.", ds, DEEPSPEED_KEYS),
                                  ("deepspeed.checkpoint.", checkpoint_keys, DEEPSPEED_CHECKPOINT_KEYS)):
        for key in keys:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                raise ValueError(f"{src}: unknown key '{prefix}{key}': DeepSpeed would ignore it"
                                 + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != "auto" and (isinstance(ds[key], bool) or not isinstance(ds[key], int)):
            raise ValueError(f"{src}: key 'deepspeed.{key}' must be an integer or \"auto\", got {ds[key]!r}")
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip)):
        raise ValueError(f"{src}: key 'deepspeed.gradient_clipping' must be a number or \"auto\", got {clip!r}")
    expected = {"train_micro_batch_size_per_gpu": cfg.train.images_per_rank,
                "gradient_accumulation_steps": cfg.train.grad_accum_steps}
    for key, value in expected.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ValueError(f"{src}: key 'deepspeed.{key}' is {ds[key]} but the train section gives {value}")
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{src}: keys 'deepspeed.optimizer'/'deepspeed.scheduler' are not used: the trainer "
                         "builds a torch AdamW and the warm-up/milestone schedule from the train section")
    if "bfloat16" in ds:  # DeepSpeed reads this alias only without "bf16", which the trainer always writes
        raise ValueError(f"{src}: key 'deepspeed.bfloat16' would be ignored; use 'deepspeed.bf16' (or train.precision)")
    for key in ("zero_optimization", "bf16", "fp16", "checkpoint", "torch_autocast"):
        if key in ds and not isinstance(ds[key], dict):
            raise ValueError(f"{src}: key 'deepspeed.{key}' must be an object, got {ds[key]!r}")
    if ds.get("fp16", {}).get("enabled", False) not in (False,):
        raise ValueError(f"{src}: key 'deepspeed.fp16.enabled': fp16 is not supported, use train.precision bf16")
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled", False) and (str(autocast.get("dtype", "")).removeprefix("torch.")
                                           not in ("bf16", "bfloat16", "fp32", "float32", "float")):
        # fp16 is not supported (at stage 0 DeepSpeed's GradScaler would skip inf steps without the
        # trainer knowing), and without a dtype torch.autocast takes float16 on CUDA
        raise ValueError(f"{src}: key 'deepspeed.torch_autocast.dtype' must be bfloat16 or float32 when autocast is "
                         f"enabled (fp16 is not supported), got {autocast.get('dtype')!r}")
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if not (isinstance(bf16, bool) or bf16 == "auto"):
        raise ValueError(f"{src}: key 'deepspeed.bf16.enabled' must be true, false or \"auto\", got {bf16!r}")
    if (bf16 is True and cfg.train.precision == "fp32") or (bf16 is False and cfg.train.precision == "bf16"):
        raise ValueError(f"{src}: key 'deepspeed.bf16.enabled' ({bf16}) contradicts 'train.precision' "
                         f"({cfg.train.precision}); set one of them to \"auto\"")
    if clip != "auto" and clip != cfg.train.grad_clip:
        raise ValueError(f"{src}: key 'deepspeed.gradient_clipping' is {clip} but 'train.grad_clip' is "
                         f"{cfg.train.grad_clip}; use \"auto\"")
    writer = ds.get("checkpoint", {}).get("writer")
    if isinstance(writer, dict) and writer.get("decoupled"):
        # DeepSpeed's decoupled writer returns from save_checkpoint before the files are written (it
        # commits them at the next optimizer step); the trainer renames a checkpoint into place as
        # complete once every rank's save has returned, which would publish half-written files.
        raise ValueError(f"{src}: key 'deepspeed.checkpoint.writer.decoupled' is not supported: checkpoints are "
                         "committed atomically when save_checkpoint returns, before a decoupled writer has "
                         "written them; drop the key")
    if "datastates_ckpt" in ds:
        # its presence alone (even {"enabled": false}) makes DeepSpeed 0.19.8 save through the
        # asynchronous DataStates engine where that package is installed: the same half-written files
        raise ValueError(f"{src}: key 'deepspeed.datastates_ckpt' is not supported: its checkpoint engine returns from "
                         "save_checkpoint before the files are written, and checkpoints are committed atomically "
                         "when it returns; drop the key")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{src}: key 'deepspeed.zero_optimization.stage' must be 0-3, got {stage!r}")
    if stage == 3 and cfg.resam.teacher_ema > 0:
        raise ValueError(f"{src}: key 'resam.teacher_ema' is not supported with ZeRO stage 3 (it partitions the "
                         "LoRA weights that the EMA teacher swaps in); use stage 0-2")
    if stage == 3 and cfg.train.activation_checkpointing != "off":
        raise ValueError(f"{src}: key 'train.activation_checkpointing' is not supported with ZeRO stage 3 "
                         "(its parameter gathering would run again inside every recomputation); use stage 0-2")


def _merge(section: dict[str, Any], update: dict[str, Any]) -> None:
    """Sets the keys of `update` in `section`, object values into object values, recursively."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            _merge(section[key], value)
        else:
            section[key] = value


def _overridden(dotted: str, overrides: dict[str, Any]) -> bool:
    """Whether an override sets key `dotted`: by that name, or inside an object given for one of
    its sections (e.g. 'model' = {"checkpoint": ...} sets 'model.checkpoint')."""
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        prefix, rest = ".".join(parts[:depth]), parts[depth:]
        if prefix not in overrides:
            continue
        node = overrides[prefix]
        for part in rest:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read, type-check and validate a config file. `overrides` maps dotted keys to values."""
    path = Path(path)
    source = str(path)

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """One JSON object's keys; json.loads would keep only the last of a repeated key."""
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{source}: key '{key}' appears twice in one object (the first would be ignored)")
            seen[key] = value
        return seen

    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=refuse_duplicates)
    except FileNotFoundError:
        raise ValueError(f"{source}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: the config must be a JSON object, got {type(raw).__name__}")
    if overrides:  # errors name the file and the keys set on the command line
        source = f"{source} with --set {', '.join(overrides)}"
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{source}: override '{dotted}': '{part}' is not a section")
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            _merge(node[last], value)  # an object given for a section sets its keys, keeps the others
        else:
            node[last] = value
    cfg = _build(Config, raw, "", source)
    cfg.source = source
    # relative paths: those in the file against the file's folder, those given as overrides (on
    # the command line) against the working directory, as a shell user expects
    for section, name in (("data", "train_shards"), ("data", "test_annotations"), ("data", "test_images"),
                          ("model", "checkpoint")):
        value = getattr(getattr(cfg, section), name)
        if value and not Path(value).is_absolute():
            base = Path.cwd() if _overridden(f"{section}.{name}", overrides or {}) else path.resolve().parent
            setattr(getattr(cfg, section), name, os.path.normpath(base / value))
    validate(cfg)
    return cfg


def deepspeed_dict(cfg: Config, world_size: int, bf16_supported: bool) -> dict[str, Any]:
    """The DeepSpeed block with "auto" filled and batch sizes checked against the world size."""
    src = cfg.source or "<config>"
    ds = json.loads(json.dumps(cfg.deepspeed))  # deep copy
    micro, accum = cfg.train.images_per_rank, cfg.train.grad_accum_steps
    filled = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * world_size, "gradient_clipping": cfg.train.grad_clip}
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ValueError(f"{src}: key 'deepspeed.train_batch_size' is {ds['train_batch_size']} but "
                         f"images_per_rank x grad_accum_steps x world_size = {micro} x {accum} x {world_size}")
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and bf16_supported)
    if cfg.train.precision == "bf16" and not bf16_supported:
        raise ValueError(f"{src}: key 'train.precision' is bf16 but this device does not support bf16")
    if cfg.deepspeed.get("bf16", {}).get("enabled") is True and not bf16_supported:
        raise ValueError(f"{src}: key 'deepspeed.bf16.enabled' is true but this device does not support bf16")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = use_bf16
    ds.setdefault("steps_per_print", 10**9)
    return ds
