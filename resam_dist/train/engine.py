"""The distributed trainer: DeepSpeed (ZeRO 1/2/3), the loop, the loss guard, checkpoints, exports.

    trainer = Trainer(cfg)      # process group, model + LoRA, deepspeed.initialize, resume, loader
    trainer.train()             # until train.max_steps optimizer steps (or train.epochs epochs)
    trainer.close()

Build. torch.distributed is initialised here (gloo on CPU, nccl on CUDA, collective timeout
`train.collective_timeout_s`) before `deepspeed.initialize`, which reuses the group. The model is
SAM with LoRA on the encoder qkv (only LoRA trains), wrapped in `TrainStepModule`, whose forward is
one training objective, so DeepSpeed's (and ZeRO-3's) forward hooks run once per step. The
optimizer is a torch AdamW over the LoRA parameters and the schedule a torch LambdaLR (warm-up +
milestones), both handed to DeepSpeed; bf16 where the device supports it (`train.precision`).

Step. Per micro-batch: forward (teacher, Refine, Requery, student, loss) -> loss guard -> backward
-> `engine.step()` (optimizer step every `train.grad_accum_steps` micro-batches) -> push the
weak-view embeddings of ALL ranks to the queue (all-gather, rank order). The loss guard
all-reduces one small vector [loss, loss parts, non-finite flag] before backward, so every rank
takes the same decision: a micro-batch whose loss is non-finite on any rank, or whose mean loss
exceeds `resam.loss_spike_factor` times the mean of the last `resam.loss_window` accepted losses
(once the window is full), is skipped on all ranks: no backward, no optimizer step, no queue
push. Its images count as read; the skip is counted (metric, log) and the step is retried with
the next batch. Losses of micro-batches without an instance on any rank (zeros) stay out of the
spike window. An optimizer update that DeepSpeed skips for non-finite gradients is counted too
(`nonfinite_grad`); the step still counts, and the schedule keeps the trainer's step numbers.

Checkpoints (`train/checkpoint.py`): every `checkpoint.every_steps` optimizer steps and at the
end: DeepSpeed engine state, the queue, the data position, RNG states, step, loss-guard window,
and with `resam.teacher_ema` the EMA teacher's averages (`train/ema.py`: the teacher's passes run
with them; they are updated after every optimizer step).
A restart with the same output_dir resumes from `latest` by itself; the losses of a resumed run
equal those of an uninterrupted one (bitwise on CPU in fp32).

Exports at the end (rank 0, `<output_dir>/export/`): `adapter/` (peft LoRA format) and
`sam_merged.pth` (LoRA folded into qkv, official SAM key layout) for inference.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resam_dist import distributed
from resam_dist.config import Config, deepspeed_dict
from resam_dist.data.batch import Batch
from resam_dist.durable import fsync_dir, fsync_file
from resam_dist.model.build import build_sam
from resam_dist.model.lora import apply_lora, merge_lora, save_adapter
from resam_dist.resam.queue import EmbeddingQueue
from resam_dist.resam.step import StepResult, resam_step
from resam_dist.train.checkpoint import (CheckpointManager, capture_rng_state, check_data_order, check_engine_layout,
                                         changed_optimizer_settings, changed_schedule_settings, check_frozen_weights,
                                         frozen_weights_digest, load_trainable_state, restore_rng_state)
from resam_dist.train.ema import EmaTeacher, resume_notice
from resam_dist.train.metrics import SKIP_REASONS, JsonlLog, ProgressBar, TrainMetrics
from resam_dist.train.schedule import build_scheduler, schedule_warnings, set_peak_settings

LOG_FILE = "train_log.jsonl"
EXPORT_DIR = "export"
MERGED_FILE = "sam_merged.pth"


class TrainStepModule(nn.Module):
    """What DeepSpeed wraps: `sam` (PromptableSam with LoRA) plus a forward that is one training
    objective on a batch, so the engine's forward (and ZeRO-3's root hooks) run once per step.

    Call it with keyword arguments and read a dict back (the `StepResult` fields): ZeRO-3's module
    hooks look for tensors in the positional inputs and in the outputs, and understand only
    tensors, tuples, lists and dicts."""

    def __init__(self, sam: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.sam = sam
        self.cfg = cfg

    def forward(self, *, batch: Batch, step_state: Any, min_chunks: int = 1,
                teacher_weights: Callable[[], contextlib.AbstractContextManager] | None = None,
                monitor_ious: bool = True) -> dict[str, Any]:
        if self.cfg.resam.method == "pointsam":
            from resam_dist.resam.pointsam import pointsam_step
            result = pointsam_step(self.sam, batch, step_state, self.cfg, min_chunks=min_chunks)
        else:
            result = resam_step(self.sam, batch, step_state, self.cfg, min_chunks=min_chunks,
                                teacher_weights=teacher_weights, monitor_ious=monitor_ious)
        return {"loss": result.loss, "parts": result.parts, "weak_embeddings": result.weak_embeddings,
                "stats": result.stats}


@dataclass
class GuardVerdict:
    skip_reason: str | None      # None, "nonfinite" or "spike"
    loss: float                  # sum of the ranks' finite losses / world size (the mean when all are finite)
    parts: dict[str, float]      # loss parts, mean over ranks
    nonfinite_ranks: int
    instances: float = 1.0       # instances the loss was taken over, summed over ranks (0: a connected zero)


class LossGuard:
    """Skips non-finite or spiking losses on all ranks with one all-reduce (see the module docstring)."""

    def __init__(self, *, spike_factor: float, window: int, world_size: int) -> None:
        if window < 1:
            raise ValueError(f"resam.loss_window must be >= 1, got {window}")
        self.spike_factor = spike_factor
        self.world_size = world_size
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def check(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], *, instances: float = 1.0) -> GuardVerdict:
        """Collective: every rank calls it with its loss (scalar), parts (same keys on all ranks)
        and the number of instances its loss was taken over."""
        names = sorted(parts)
        local = torch.stack([loss.detach().float().reshape(())]
                            + [parts[name].detach().float().reshape(()) for name in names])  # 1 + P
        finite = torch.isfinite(local).all()
        payload = torch.cat([torch.where(finite, local, torch.zeros_like(local)),
                             (~finite).float().reshape(1),
                             local.new_tensor([float(instances)])])  # 3 + P: values, non-finite flag, instances
        if distributed.is_initialized() and self.world_size > 1:
            dist.all_reduce(payload, op=dist.ReduceOp.SUM)
        values = payload.tolist()
        nonfinite_ranks = int(values[-2])
        mean_loss = values[0] / self.world_size
        mean_parts = {name: values[1 + i] / self.world_size for i, name in enumerate(names)}
        reason = None
        if nonfinite_ranks > 0:
            reason = "nonfinite"
        elif (len(self.recent) == self.recent.maxlen
              and mean_loss > self.spike_factor * (sum(self.recent) / len(self.recent))):
            reason = "spike"
        return GuardVerdict(skip_reason=reason, loss=mean_loss, parts=mean_parts, nonfinite_ranks=nonfinite_ranks,
                            instances=values[-1])

    def accept(self, verdict: GuardVerdict) -> None:
        """Records an accepted loss in the spike window, unless no rank had an instance: such a
        loss is a connected zero, and zeros would pull the window's mean to 0, after which every
        real loss would read as a spike."""
        if verdict.instances > 0:
            self.recent.append(verdict.loss)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = collections.deque(state["recent"], maxlen=self.recent.maxlen)


@dataclass
class _Window:
    """Sums over the micro-batches of one optimizer step."""

    micro_batches: int = 0
    images: int = 0
    loss: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    data_wait: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    stats_count: dict[str, int] = field(default_factory=dict)  # micro-batches that reported each stat
    lr: float = 0.0

    def add(self, verdict: GuardVerdict, *, images: int, seconds: float, data_wait: float,
            stats: dict[str, float], lr: float) -> None:
        self.micro_batches += 1
        self.images += images
        self.loss += verdict.loss
        for name, value in verdict.parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.seconds += seconds
        self.data_wait += data_wait
        for name, value in stats.items():  # (IoU stats are absent for micro-batches without foreground)
            self.stats[name] = self.stats.get(name, 0.0) + float(value)
            self.stats_count[name] = self.stats_count.get(name, 0) + 1
        self.lr = lr


def _bf16_supported(cfg: Config, device: torch.device) -> bool:
    """CUDA: the device's bf16 support. CPU: bf16 only when train.precision asks for it ("auto" is fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that clips the gradients to a total norm of `clip_grad` (0: no clipping) and skips an
    update whose gradients, or their total norm, are not finite, saying so in `overflow`:
    DeepSpeed's engine reads that attribute after `step()` for `was_step_applied()` and then
    leaves its schedule alone, as when ZeRO 1-3 or its bf16 optimizer skip such an update
    themselves. Only fp32 at ZeRO stage 0 hands the plain optimizer the gradients as they are
    (an update of NaN gradients would make every later loss NaN); the trainer uses this class
    there only (DeepSpeed's ZeRO optimizers refuse an AdamW subclass), with DeepSpeed's own
    clipping off: DeepSpeed would clip first, and finite gradients whose total norm overflows
    fp32 would reach this check as zeros and still be stepped (weight decay, moments). The norm
    is DeepSpeed's at stage 0 (the 2-norm of the per-tensor 2-norms, in fp32; the gradients are
    already averaged over the ranks), kept in `_global_grad_norm` for the engine."""

    overflow = False

    def __init__(self, params, *, clip_grad: float = 0.0, **adamw_kwargs: Any) -> None:
        super().__init__(params, **adamw_kwargs)
        self.clip_grad = clip_grad
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [param.grad for group in self.param_groups for param in group["params"] if param.grad is not None]
        if not grads:
            self.overflow = False
            return super().step(closure)
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad.float()) for grad in grads]))
        self._global_grad_norm = total_norm
        self.overflow = not bool(torch.isfinite(total_norm))  # (a NaN or infinite element makes it so too)
        if self.overflow:
            return None
        if self.clip_grad > 0:
            coefficient = torch.clamp(self.clip_grad / (total_norm + 1e-6), max=1.0)  # DeepSpeed's
            torch._foreach_mul_(grads, coefficient)
        return super().step(closure)


def build_optimizer(trainable: list[torch.nn.Parameter], cfg: Config, *, zero_stage: int, bf16: bool
                    ) -> tuple[torch.optim.Optimizer, float]:
    """AdamW over the trainable (LoRA) tensors, and the "gradient_clipping" DeepSpeed is to apply:
    train.grad_clip, except at ZeRO stage 0 in fp32, where `FiniteStepAdamW` clips after its own
    finiteness check (and DeepSpeed is given 0)."""
    if zero_stage == 0 and not bf16:
        return (FiniteStepAdamW(trainable, clip_grad=cfg.train.grad_clip, lr=cfg.train.lr,
                                weight_decay=cfg.train.weight_decay), 0.0)
    return torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay), cfg.train.grad_clip


def initialize_deepspeed(cfg: Config, **kwargs: Any) -> tuple:
    """deepspeed.initialize(**kwargs); a key of the config's "deepspeed" block that DeepSpeed refuses
    (its pydantic sections, e.g. zero_optimization and bf16, allow no unknown key) is a ValueError
    naming the config file."""
    import deepspeed
    from pydantic import ValidationError

    try:
        return deepspeed.initialize(**kwargs)
    except ValidationError as err:
        raise ValueError(f"{cfg.source or '<config>'}: DeepSpeed refuses the 'deepspeed' block: {err}") from None


def _disable_deepspeed_shm_build() -> None:
    """deepspeed.comm JIT-builds its CPU shared-memory collective op (~35-50 s) when it wraps the
    process group, which training does not need (gloo does the work): mark it unavailable.
    DeepSpeed keeps `deepspeed.ops.__compatible_ops__` as one dict meant to be edited."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Trainer:
    """One rank of a ReSAM training run (see the module docstring)."""

    def __init__(self, cfg: Config, *, local_rank_arg: int | None = None) -> None:
        self.cfg = cfg
        self.info = distributed.init_distributed(cfg.train.collective_timeout_s, local_rank_arg=local_rank_arg)
        distributed.check_node_local_options(cfg.deepspeed, self.info, cfg.source or "<config>")
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        faults = cfg.faults
        if (faults.nan_loss_step or faults.nan_grad_step) and faults.nan_loss_rank >= self.world_size:
            raise ValueError(f"{cfg.source or '<config>'}: key 'faults.nan_loss_rank' ({faults.nan_loss_rank}) names "
                             f"no rank of this world of {self.world_size}: the fault would never fire")
        self.is_main = self.rank == 0
        self.output_dir = Path(cfg.train.output_dir)
        self.zero_stage = int(cfg.deepspeed.get("zero_optimization", {}).get("stage", 0))
        self._seed_everything(cfg.train.seed + self.rank)

        # ---- model, LoRA, optimizer, schedule, DeepSpeed --------------------------------------
        sam = build_sam(cfg.model.name, cfg.model.checkpoint, seed=cfg.train.seed, attention=cfg.model.attention)
        apply_lora(sam, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   start_block=cfg.lora.start_block, seed=cfg.train.seed + 1)
        # checkpoints hold the trainable weights only: this digest names the frozen ones they need
        self.frozen_digest = frozen_weights_digest(sam)
        sam.set_activation_checkpointing(cfg.train.activation_checkpointing)
        sam.train()  # LoRA dropout on (SAM itself has no dropout or batch norm)
        if self.zero_stage == 3:
            from deepspeed.utils import set_z3_leaf_module
            for module in sam.leaf_modules():
                set_z3_leaf_module(module, True)
        self.sam = sam
        module = TrainStepModule(sam, cfg)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{cfg.source}: no trainable (LoRA) parameters; check the 'lora' section")
        self.ds_config = deepspeed_dict(cfg, self.world_size, _bf16_supported(cfg, self.device))
        self.bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))
        # (the resolved config written beside the run shows gradient_clipping 0 at stage 0 in fp32)
        optimizer, self.ds_config["gradient_clipping"] = build_optimizer(trainable, cfg, zero_stage=self.zero_stage,
                                                                         bf16=self.bf16)
        # images one optimizer step stands for in the schedule (1: it counts optimizer steps)
        self.schedule_images_per_step = (cfg.train.images_per_rank * self.world_size * cfg.train.grad_accum_steps
                                         if cfg.train.schedule_unit == "images" else 1)
        scheduler = build_scheduler(optimizer, warmup_steps=cfg.train.warmup_steps,
                                    milestones=cfg.train.milestones, gamma=cfg.train.lr_gamma,
                                    images_per_step=self.schedule_images_per_step)
        if self.device.type == "cpu":
            _disable_deepspeed_shm_build()
        self.engine, self.optimizer, _, self.scheduler = initialize_deepspeed(
            cfg, model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.images_per_step = cfg.train.images_per_rank * cfg.train.grad_accum_steps
        # the EMA teacher averages the module's own LoRA tensors (cast to the engine's dtype by now)
        self.teacher_ema = (EmaTeacher(trainable, cfg.resam.teacher_ema) if cfg.resam.teacher_ema > 0
                            else None)

        # ---- trainer state: queue (or PointSAM store), guard, counters ------------------------
        if cfg.resam.method == "pointsam":
            from resam_dist.resam.pointsam import PointSamState
            self.step_state: Any = PointSamState.from_config(cfg, dim=sam.embed_dim)
        else:
            self.step_state = EmbeddingQueue(cfg.resam.queue_size, sam.embed_dim, device=self.device)
        self.guard = LossGuard(spike_factor=cfg.resam.loss_spike_factor, window=cfg.resam.loss_window,
                               world_size=self.world_size)
        self.step = 0
        self.data_position = 0
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self._nan_fired = False
        self._nan_grad_fired = False
        self._unlogged_step: dict[str, Any] | None = None  # rank 0: the last step's record, if not logged

        # ---- resume ---------------------------------------------------------------------------
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             rank=self.rank, world_size=self.world_size)
        self.checkpoints.prepare()
        if not cfg.checkpoint.resume and self.checkpoints.latest_tag() is not None:
            raise ValueError(f"{cfg.source}: checkpoint.resume is false but {self.checkpoints.root} already holds "
                             "checkpoints of another run: use a fresh train.output_dir (or resume)")
        self.resumed_from = self._resume() if cfg.checkpoint.resume else None

        # ---- data, telemetry ------------------------------------------------------------------
        from resam_dist.data.pipeline import build_train_loader

        self.loader = build_train_loader(cfg, image_size=sam.image_size, rank=self.rank,
                                         world_size=self.world_size, local_rank=self.info.local_rank,
                                         device=self.device, start_position=self.data_position)
        self.data_order = self._data_order()  # recorded in every checkpoint's meta.json
        if self.resumed_from is not None:
            check_data_order(self.checkpoints.read_meta(self.resumed_from), self.data_order,
                             source=f"checkpoint {self.checkpoints.root / self.resumed_from}",
                             config=str(cfg.source or "<config>"))
        if cfg.train.max_steps > 0:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = cfg.train.epochs * len(self.loader) // cfg.train.grad_accum_steps
        self.metrics = TrainMetrics(rank=self.rank, local_rank=self.info.local_rank,
                                    base_port=cfg.metrics.base_port, enabled=cfg.metrics.enabled,
                                    device=self.device)
        self.log = JsonlLog(self.output_dir / LOG_FILE if (self.is_main and cfg.metrics.jsonl) else None)
        self._announce()

    # ------------------------------------------------------------------------------------------
    # set-up helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _announce(self) -> None:
        """Gather every rank's identity and metrics port; rank 0 logs them (console + JSON lines)."""
        me = {"rank": self.rank, "local_rank": self.info.local_rank, "host": socket.gethostname(),
              "pid": os.getpid(), "device": str(self.device), "metrics_port": self.metrics.port}
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, me)
        print(f"[rank {self.rank}/{self.world_size} local_rank {self.info.local_rank} on {me['host']}] "
              f"device {self.device}, metrics port {self.metrics.port}", flush=True)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**dataclasses.asdict(self.cfg), "deepspeed_resolved": self.ds_config}
            (self.output_dir / "config.json").write_text(json.dumps(resolved, indent=1, default=str))
            precision = "bf16" if self.bf16 else "fp32"
            print(f"[train] world {self.world_size}, ZeRO stage {self.zero_stage}, {precision}, "
                  f"{self.images_per_step} images/rank/step, {self.total_steps} steps, "
                  f"{'resumed from ' + self.resumed_from if self.resumed_from else 'fresh start'}", flush=True)
            for note in schedule_warnings(total_steps=self.total_steps, warmup_steps=self.cfg.train.warmup_steps,
                                          milestones=self.cfg.train.milestones,
                                          images_per_step=self.schedule_images_per_step,
                                          unit=self.cfg.train.schedule_unit):
                print(f"[train] warning: {note}", flush=True)
            self.log.write({"event": "start", "world_size": self.world_size, "zero_stage": self.zero_stage,
                            "precision": precision, "step": self.step, "total_steps": self.total_steps,
                            "resumed_from": self.resumed_from, "data_position": self.data_position,
                            "attention": self.cfg.model.attention,
                            "activation_checkpointing": self.cfg.train.activation_checkpointing,
                            "ranks": ranks})

    def _schedule_record(self) -> dict[str, Any]:
        """The schedule's settings, recorded in every checkpoint's meta.json (a resume says which
        it changes: `changed_schedule_settings`)."""
        train = self.cfg.train
        return {"train.schedule_unit": train.schedule_unit,
                "schedule_images_per_step": self.schedule_images_per_step,
                "train.warmup_steps": train.warmup_steps, "train.milestones": list(train.milestones),
                "train.lr_gamma": train.lr_gamma}

    def _resume(self) -> str | None:
        tag = self.checkpoints.latest_tag()
        if tag is None:
            return None
        client = self.checkpoints.load_client_state(tag)
        source = f"checkpoint {self.checkpoints.root / tag}"
        # (refused before DeepSpeed loads anything when the configured teacher needs averages)
        notice = resume_notice(client.get("teacher_ema"), self.cfg.resam.teacher_ema, source=source)
        meta = self.checkpoints.read_meta(tag)
        check_frozen_weights(meta, self.frozen_digest, source=source)
        check_engine_layout(meta, zero_stage=self.zero_stage, bf16=self.bf16, source=source,
                            config=str(self.cfg.source))
        changed = changed_optimizer_settings(meta, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay,
                                             grad_clip=self.cfg.train.grad_clip)
        changed += changed_schedule_settings(meta, self._schedule_record())
        if changed and self.is_main:
            print(f"[train] resuming {source} with {', '.join(changed)} ({self.cfg.source}): the optimizer's "
                  "moments and the schedule's step are kept", flush=True)
        if notice is not None and self.is_main:
            print(f"[train] warning: {notice}", flush=True)

        def load_module(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
            load_trainable_state(src, dst, origin=source)

        load_path, _ = self.engine.load_checkpoint(str(self.checkpoints.root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True, custom_load_fn=load_module)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {self.checkpoints.root / tag}")
        # DeepSpeed restored the checkpoint's peak lr and weight decay, and in ZeRO 1-2 and its bf16
        # optimizer the gradient clipping (the other wrappers keep the config's): the config's apply
        # (FiniteStepAdamW's clip_grad, at stage 0 in fp32, is the config's already)
        set_peak_settings(self.scheduler, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = self.cfg.train.grad_clip
        self.step = int(client["step"])
        if int(self.engine.global_steps) != self.step:
            raise ValueError(f"checkpoint {tag}: trainer step {self.step} but DeepSpeed global_steps "
                             f"{self.engine.global_steps}")
        self.data_position = int(client["data_position"])
        self.step_state.load_state_dict(client["step_state"])
        self.guard.load_state_dict(client["guard"])
        self.skipped = {**dict.fromkeys(SKIP_REASONS, 0), **client["skipped"]}  # (older checkpoints lack reasons)
        if self.teacher_ema is not None:
            self.teacher_ema.load_state_dict(client["teacher_ema"], source=source)
        restore_rng_state(client["rng"], self.device)
        return tag

    # ------------------------------------------------------------------------------------------
    # the loop

    def _prepare(self, batch: Batch) -> Batch:
        batch = batch.to(self.device)
        if self.bf16:  # DeepSpeed runs the module in bf16; the images follow (coordinates stay float32)
            batch.weak = batch.weak.to(torch.bfloat16)
            batch.strong = batch.strong.to(torch.bfloat16)
        return batch

    def _min_chunks(self, batch: Batch) -> int:
        """ZeRO-3: every rank must make the same number of decoder calls (max over ranks)."""
        if self.zero_stage != 3:
            return 1
        chunks = torch.tensor([max(1, math.ceil(batch.points.shape[1] / self.cfg.data.max_instances))],
                              dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(chunks, op=dist.ReduceOp.MAX)
        return int(chunks.item())

    def _poison(self, loss: torch.Tensor) -> torch.Tensor:
        faults = self.cfg.faults
        if (faults.nan_loss_step and not self._nan_fired and self.step + 1 == faults.nan_loss_step):
            self._nan_fired = True
            if self.rank == faults.nan_loss_rank:
                print(f"[rank {self.rank}] faults.nan_loss_step: loss x NaN at step {self.step + 1}", flush=True)
                return loss * float("nan")
        return loss

    def _poison_gradient(self, loss: torch.Tensor) -> torch.Tensor:
        """faults.nan_grad_step: a loss of the same value whose gradient is NaN (0 x d sqrt(0)), on
        rank faults.nan_loss_rank at the first micro-step of that optimizer step."""
        faults = self.cfg.faults
        if faults.nan_grad_step and not self._nan_grad_fired and self.step + 1 == faults.nan_grad_step:
            self._nan_grad_fired = True
            if self.rank == faults.nan_loss_rank:
                print(f"[rank {self.rank}] faults.nan_grad_step: NaN gradient at step {self.step + 1}", flush=True)
                return loss + 0.0 * torch.sqrt(loss * 0.0)
        return loss

    def _record_skipped_update(self) -> None:
        """DeepSpeed skipped the optimizer update of the step just ended: its gradients, or their
        total norm, were not finite (ZeRO 1-3 and the bf16 optimizer check them, `FiniteStepAdamW`
        at stage 0 in fp32).
        The step counts (its data was read); the EMA teacher is not updated; the schedule, which
        DeepSpeed did not advance, is stepped here so that its warm-up and milestones stay at the
        trainer's step numbers."""
        self.engine.lr_scheduler.step()
        self.skipped["nonfinite_grad"] += 1
        self.metrics.observe_skipped_update()
        if self.is_main:
            print(f"[train] step {self.step + 1}: DeepSpeed skipped the optimizer update (non-finite gradients "
                  "or gradient norm)",
                  flush=True)
            self.log.write({"event": "skip", "step": self.step + 1, "reason": "nonfinite_grad",
                            "skipped": dict(self.skipped), "data_position": self.data_position})

    def _data_order(self) -> dict[str, Any]:
        """What the data position of a checkpoint depends on (recorded in its meta.json): the shards
        (names, sample counts and the manifest's sha256), the seed, the shuffling and the batch size."""
        shards = [[shard.tar.name, shard.num_samples, shard.sha256] for shard in self.loader.shards]
        return {"shards_sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest(),
                "data.seed": self.cfg.data.seed, "data.shuffle": self.cfg.data.shuffle,
                "data.shuffle_buffer": self.cfg.data.shuffle_buffer,
                "train.images_per_rank": self.cfg.train.images_per_rank}

    def _loss_instances(self, stats: dict[str, float]) -> float:
        """The instances a micro-batch's loss was taken over (0: the loss is a connected zero)."""
        return stats["instances"] if self.cfg.resam.method == "pointsam" else stats["n_valid"]

    def _finished(self) -> bool:
        if self.cfg.train.max_steps > 0:
            return self.step >= self.cfg.train.max_steps
        return self.loader.epoch >= self.cfg.train.epochs

    def train(self) -> dict[str, Any]:
        """Run to the end; returns a summary (rank-local): steps, skipped, last loss."""
        cfg = self.cfg
        bar = ProgressBar(enabled=self.is_main, total=self.total_steps, initial=self.step)
        window = _Window()
        last_loss = float("nan")
        last_checkpoint = self.step
        try:
            while not self._finished():
                # a resumed run starts inside an epoch: only a whole epoch of skipped batches means
                # training cannot progress (a skipped tail after a resume is replayed exactly, and must
                # not stop every relaunch)
                whole_epoch = self.loader.position % self.loader.samples_per_epoch == 0
                served_in_epoch = accepted_in_epoch = 0
                batches = iter(self.loader)
                while not self._finished():
                    wait_start = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        break
                    served_in_epoch += 1
                    step_start = time.perf_counter()
                    data_wait = step_start - wait_start
                    self.data_position = batch.position
                    batch = self._prepare(batch)
                    min_chunks = self._min_chunks(batch)
                    result = StepResult(**self.engine(
                        batch=batch, step_state=self.step_state, min_chunks=min_chunks,
                        teacher_weights=self.teacher_ema.weights if self.teacher_ema is not None else None,
                        monitor_ious=self.is_main and self._logs_step(self.step + 1)))
                    loss = self._poison(result.loss)
                    verdict = self.guard.check(loss, result.parts, instances=self._loss_instances(result.stats))
                    images = batch.weak.shape[0]
                    if verdict.skip_reason is not None:
                        del result, loss
                        self._record_skip(verdict, images=images, seconds=time.perf_counter() - step_start,
                                          data_wait=data_wait)
                        continue
                    lr = float(self.engine.get_lr()[0])
                    self.engine.backward(self._poison_gradient(loss))
                    self.engine.step()
                    stepped = int(self.engine.global_steps) != self.step  # the end of an accumulation window
                    if stepped and not self.engine.was_step_applied():
                        self._record_skipped_update()
                    elif stepped and self.teacher_ema is not None:
                        self.teacher_ema.update()  # an optimizer step was taken
                    if isinstance(self.step_state, EmbeddingQueue):
                        if cfg.resam.method == "resam":  # (selftrain and supervised have no embeddings)
                            self.step_state.push_all_ranks(result.weak_embeddings)  # after the loss, all ranks
                    else:  # PointSAM-style store: only accepted steps change it
                        self.step_state.commit(result.weak_embeddings, images)
                    self.guard.accept(verdict)
                    accepted_in_epoch += 1
                    window.add(verdict, images=images, seconds=time.perf_counter() - step_start,
                               data_wait=data_wait, stats=result.stats, lr=lr)
                    del result, loss
                    if int(self.engine.global_steps) == self.step:
                        continue  # inside a gradient-accumulation window
                    self.step = int(self.engine.global_steps)
                    last_loss = window.loss / window.micro_batches
                    self._record_step(window, bar)
                    window = _Window()
                    every = cfg.checkpoint.every_steps
                    if every > 0 and self.step % every == 0:
                        self.save_checkpoint()
                        last_checkpoint = self.step
                if whole_epoch and accepted_in_epoch == 0 and not self._finished():
                    raise RuntimeError(f"the loss guard skipped every batch of a whole epoch ({served_in_epoch} "
                                       f"batches; skipped so far: {self.skipped}): training cannot progress")
            if self._unlogged_step is not None and self._unlogged_step["step"] == self.step:
                # the last step, which `_logs_step` could not foresee: skipped batches made the run
                # end short of total_steps (its monitoring IoUs were not computed)
                self.log.write(self._unlogged_step)
            bar.finish(self.step)
            if self.step != last_checkpoint or self.checkpoints.latest_tag() is None:
                self.save_checkpoint()
            exports = self.export()
        finally:
            bar.close()
        if self.is_main:
            self.log.write({"event": "end", "step": self.step, "skipped": self.skipped, "exports": exports})
            print(f"[train] done: {self.step} steps, skipped {self.skipped}, exports in "
                  f"{self.output_dir / EXPORT_DIR}", flush=True)
        return {"step": self.step, "skipped": dict(self.skipped), "loss": last_loss}

    def _record_step(self, window: _Window, bar: ProgressBar) -> None:
        count = window.micro_batches
        loss = window.loss / count
        parts = {name: value / count for name, value in window.parts.items()}
        queue_entries = len(self.step_state) if isinstance(self.step_state, EmbeddingQueue) else 0
        memory = self.metrics.observe_step(images=window.images, duration_s=window.seconds,
                                           data_wait_s=window.data_wait, losses={"total": loss, **parts},
                                           learning_rate=window.lr, queue_entries=queue_entries)
        seconds = window.seconds + window.data_wait
        local_rate = window.images / seconds if seconds > 0 else 0.0
        memory_bytes = memory.get("allocated_bytes", memory["rss_bytes"])
        bar.update(step=self.step, loss=loss, images_per_second=local_rate * self.world_size,
                   memory_bytes=memory_bytes)
        if not self.is_main:
            return
        epoch = (self.data_position - 1) // self.loader.samples_per_epoch  # of the last batch
        record = {
            "event": "step", "step": self.step, "epoch": epoch, "loss": loss, "parts": parts, "lr": window.lr,
            "images": window.images * self.world_size,
            "images_per_second": local_rate * self.world_size, "step_seconds": window.seconds,
            "data_wait_seconds": window.data_wait, "queue_entries": queue_entries,
            "skipped": dict(self.skipped), "data_position": self.data_position, "memory": memory,
            "stats_rank0": {name: value / window.stats_count[name] for name, value in window.stats.items()},
        }
        if self._logs_step(self.step):
            self.log.write(record)
            self._unlogged_step = None
        else:  # written at the end if it turns out to be the last step (epochs with skipped batches)
            self._unlogged_step = record

    def _logs_step(self, step: int) -> bool:
        """Whether rank 0 writes optimizer step `step` to the log (its stats: only those steps'
        micro-batches compute the monitoring IoUs)."""
        return step % max(1, self.cfg.train.log_every) == 0 or step >= self.total_steps

    def _record_skip(self, verdict: GuardVerdict, *, images: int, seconds: float, data_wait: float) -> None:
        reason = verdict.skip_reason
        assert reason is not None
        self.skipped[reason] += 1
        self.metrics.observe_skip(reason=reason, images=images, duration_s=seconds, data_wait_s=data_wait)
        if self.is_main:
            detail = (f"non-finite loss on {verdict.nonfinite_ranks} rank(s)" if reason == "nonfinite"
                      else f"loss {verdict.loss:.4g} > {self.guard.spike_factor} x recent mean")
            print(f"[train] step {self.step + 1} skipped on all ranks: {detail}", flush=True)
            self.log.write({"event": "skip", "step": self.step + 1, "reason": reason, "loss": verdict.loss,
                            "nonfinite_ranks": verdict.nonfinite_ranks, "skipped": dict(self.skipped),
                            "data_position": self.data_position})

    # ------------------------------------------------------------------------------------------
    # checkpoints and exports

    def save_checkpoint(self) -> str:
        client = {"step": self.step, "data_position": self.data_position,
                  "step_state": self.step_state.state_dict(), "guard": self.guard.state_dict(),
                  "skipped": dict(self.skipped), "rng": capture_rng_state(self.device)}
        if self.teacher_ema is not None:
            client["teacher_ema"] = self.teacher_ema.state_dict()

        def write_engine(root: Path, tag: str) -> None:
            self.engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)

        tag = self.checkpoints.save(self.step, write_engine=write_engine, client_state=client,
                                    meta={"zero_stage": self.zero_stage, "bf16": self.bf16,
                                          "train.lr": self.cfg.train.lr,
                                          "train.weight_decay": self.cfg.train.weight_decay,
                                          "train.grad_clip": self.cfg.train.grad_clip,
                                          **self._schedule_record(),
                                          "data_order": self.data_order,
                                          "data_position_rank0": self.data_position,
                                          "frozen_weights_sha256": self.frozen_digest})
        if self.is_main:
            self.log.write({"event": "checkpoint", "step": self.step, "tag": tag})
        return tag

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 LoRA tensors keyed by PromptableSam parameter name (collective under ZeRO-3;
        every rank calls it, every rank gets them)."""
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, parameter in self.sam.named_parameters():
            if not parameter.requires_grad:
                continue
            full = safe_get_full_fp32_param(parameter)  # ZeRO: the fp32 master copy, gathered
            if full is None:  # no ZeRO and fp32: the module holds the full tensor
                full = parameter
            weights[name] = full.detach().float().cpu().clone()
        return weights

    def export(self) -> dict[str, str]:
        """Write the LoRA adapter (peft format) and the merged SAM weights (official key layout)."""
        weights = self.lora_weights()
        exports: dict[str, str] = {}
        if self.is_main:
            cfg = self.cfg
            model = build_sam(cfg.model.name, cfg.model.checkpoint, seed=cfg.train.seed)  # the base weights, fp32
            apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                       start_block=cfg.lora.start_block, seed=cfg.train.seed + 1)
            with torch.no_grad():
                for name, value in weights.items():
                    model.get_parameter(name).copy_(value)
            model.eval()
            export_dir = self.output_dir / EXPORT_DIR
            adapter_dir = save_adapter(model, export_dir / "adapter")
            merged = merge_lora(model)
            merged_path = export_dir / MERGED_FILE
            tmp_path = merged_path.with_name(merged_path.name + ".tmp")
            torch.save(merged.state_dict(), tmp_path)
            fsync_file(tmp_path)
            os.replace(tmp_path, merged_path)
            fsync_dir(export_dir)
            exports = {"adapter": str(adapter_dir), "merged": str(merged_path)}
        distributed.barrier()
        return exports

    def close(self) -> None:
        self.metrics.close()
        self.log.close()
        distributed.barrier()
        distributed.close()
