"""Atomic multi-rank checkpoints and the RNG state they carry.

Layout under `<output_dir>/checkpoints/`:

    step_00000020/                 one checkpoint (DeepSpeed tag)
        mp_rank_00_model_states.pt ... DeepSpeed engine files (module, optimizer, lr scheduler);
                                   the module's trainable (LoRA) weights and buffers only
        client_rank00000.pt        per-rank trainer state (queue, data position, RNG, loss window)
        meta.json                  step, world size, ZeRO stage, precision, digest of the frozen weights
    latest                         the tag of the newest complete checkpoint (text)

Protocol (`CheckpointManager.save`): every rank writes into a temporary tag `.tmp-step_N`,
then all ranks meet at a barrier; rank 0 writes meta.json, renames the temporary directory to
`step_N`, and only then replaces `latest` (write to a temporary file, fsync, rename). A kill at
any moment leaves a complete directory behind: resume takes the newest complete checkpoint
(`latest` is the pointer DeepSpeed's tools read; a kill between the rename and `latest` leaves it
one checkpoint behind). At the next start a leftover `.tmp-*` directory that holds a complete
checkpoint (meta.json written) whose tag is missing is renamed into place; the other leftovers
are removed. The last `keep_last` checkpoints are kept. Assumes `output_dir` is on a file system
every node sees (as for DeepSpeed itself).

The frozen SAM weights are not written (hundreds of MB to GB a checkpoint, the same every time):
a resume rebuilds them from the config's model section and `frozen_weights_digest` must match the
one in meta.json (`check_frozen_weights`). Checkpoints written with the frozen weights (before
this rule; no digest) still load whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from resam_dist import distributed
from resam_dist.durable import atomic_write_text, fsync_dir, fsync_file

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_PREFIX = "step_"


def frozen_weights_digest(module: nn.Module) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every frozen parameter (requires_grad
    False) of `module`, in registration order: what a checkpoint without them was trained over.
    Call it on the built model before DeepSpeed casts or partitions it (about 1 s per GB)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            continue
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_frozen_weights(meta: dict[str, Any], digest: str, *, source: str) -> None:
    """ValueError unless a checkpoint (its meta.json: `meta`) was trained over the frozen weights
    of digest `digest` (a checkpoint without a digest holds its frozen weights itself)."""
    saved = meta.get("frozen_weights_sha256")
    if saved is not None and saved != digest:
        raise ValueError(f"{source} was trained over other frozen SAM weights (digest {saved[:12]}) than the "
                         f"config's model section builds ({digest[:12]}): resume with the same model.name, "
                         "model.checkpoint and lora settings, or start a new train.output_dir")


def _zero_group(stage: int) -> str:
    """DeepSpeed writes its optimizer state in one layout for stage 0, one for stages 1-2 and one
    for stage 3: a checkpoint loads into any stage of its group only."""
    return "0" if stage == 0 else "1-2" if stage in (1, 2) else "3"


def check_engine_layout(meta: dict[str, Any], *, zero_stage: int, bf16: bool, source: str, config: str) -> None:
    """ValueError unless a checkpoint (its meta.json: `meta`) can be loaded by an engine of ZeRO
    stage `zero_stage` and this precision (bf16, else fp32): the stage group and the precision
    must match (checkpoints written without a record of either are not checked for it)."""
    saved_stage = meta.get("zero_stage")
    if saved_stage is not None and _zero_group(saved_stage) != _zero_group(zero_stage):
        raise ValueError(f"{source} was written with ZeRO stage {saved_stage}, {config} asks for stage "
                         f"{zero_stage} (deepspeed.zero_optimization.stage): DeepSpeed loads a checkpoint only "
                         f"at a stage of its group (0, 1-2 or 3); resume at stage(s) {_zero_group(saved_stage)} "
                         "or start a new train.output_dir")
    saved_bf16 = meta.get("bf16")
    if saved_bf16 is not None and saved_bf16 != bf16:
        names = {True: "bf16", False: "fp32"}
        raise ValueError(f"{source} was written in {names[saved_bf16]}, {config} trains in {names[bf16]} "
                         "(train.precision, resolved): DeepSpeed's optimizer state differs between them; resume "
                         f"with train.precision \"{names[saved_bf16]}\" or start a new train.output_dir")


def changed_optimizer_settings(meta: dict[str, Any], *, lr: float, weight_decay: float,
                               grad_clip: float) -> list[str]:
    """What a resumed run changes of the train.lr, train.weight_decay and train.grad_clip its
    checkpoint (meta.json: `meta`) was written with, as "KEY OLD -> NEW" (nothing for checkpoints
    written without a record of them). DeepSpeed restores the checkpoint's values (gradient
    clipping in ZeRO 1-2 and its bf16 optimizer); the trainer then applies the config's
    (`schedule.set_peak_settings`, `Trainer._resume`), so the change is made, and said."""
    changed = []
    for key, value in (("train.lr", lr), ("train.weight_decay", weight_decay), ("train.grad_clip", grad_clip)):
        saved = meta.get(key)
        if saved is not None and saved != value:
            changed.append(f"{key} {saved} -> {value}")
    return changed


def changed_schedule_settings(meta: dict[str, Any], schedule: dict[str, Any]) -> list[str]:
    """What a resumed run changes of the lr schedule its checkpoint (meta.json: `meta`) was written
    with, as "KEY OLD -> NEW"; `schedule` maps train.schedule_unit, schedule_images_per_step (the
    images one optimizer step stands for: images_per_rank x ranks x grad_accum_steps, or 1 when
    the schedule counts steps; said as "the schedule's images per step"), train.warmup_steps,
    train.milestones and train.lr_gamma to this run's values. The factor is
    rebuilt from the config at the restored step, so a change moves the lr at once: it is said. A
    checkpoint without a record of the unit was written when schedules counted optimizer steps;
    the other keys are compared only where recorded."""
    written_before = {"train.schedule_unit": "steps", "schedule_images_per_step": 1}
    labels = {"schedule_images_per_step": "the schedule's images per step"}
    changed = []
    for key, value in schedule.items():
        saved = meta.get(key, written_before.get(key))
        if saved is not None and saved != value:
            changed.append(f"{labels.get(key, key)} {saved} -> {value}")
    return changed


def check_data_order(meta: dict[str, Any], data_order: dict[str, Any], *, source: str, config: str) -> None:
    """ValueError unless a checkpoint (its meta.json: `meta`) was written over the same training
    data and data order (`data_order`, see `Trainer._data_order`): the resumed data position
    counts batch slots of that order, which other shards, seeds, shuffling or batch sizes would map
    to other samples (not checked for checkpoints written without a record of it)."""
    saved = meta.get("data_order")
    if saved is None:
        return
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in data_order.items() if saved.get(key) != value]
    if changed:
        raise ValueError(f"{source} was written over another data order than {config} gives ({'; '.join(changed)}): "
                         "its data position would point at other samples; resume with the same shards (contents), "
                         "data.seed, data.shuffle, data.shuffle_buffer and train.images_per_rank, or start a new "
                         "train.output_dir")


def load_trainable_state(source: dict[str, torch.Tensor], module: nn.Module, *, origin: str) -> None:
    """Loads a module state dict that may lack the frozen parameters into `module` (DeepSpeed's
    `custom_load_fn`): every trainable parameter must be in it, every key of it in the module, with
    the module's shape; the frozen parameters it lacks keep their values."""
    expected = module.state_dict()
    unexpected = [key for key in source if key not in expected]
    missing = [name for name, parameter in module.named_parameters() if parameter.requires_grad
               and name not in source]
    if unexpected or missing:
        raise ValueError(f"{origin}: the module weights do not match the model (trainable weights missing: "
                         f"{missing[:5]}, unknown keys: {unexpected[:5]}); were the lora settings changed?")
    reshaped = [f"{key} {tuple(tensor.shape)} -> {tuple(expected[key].shape)}" for key, tensor in source.items()
                if tensor.shape != expected[key].shape]
    if reshaped:
        raise ValueError(f"{origin}: {len(reshaped)} weight(s) have another shape than the model's, e.g. "
                         f"{reshaped[:3]}; were the lora settings (rank) changed?")
    module.load_state_dict(source, strict=False)


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


# files of a checkpoint named for the rank that writes them: DeepSpeed's per-rank ZeRO files
# ((bf16_)zero_pp_rank_<data-parallel rank>_mp_rank_00_*.pt; data parallelism only, so that rank is
# the global rank) and the trainer's client_rank<rank>.pt
_RANK_FILE_PATTERNS = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^client_rank(\d+)\.pt$"))


def files_to_sync(paths: list[Path], rank: int) -> list[Path]:
    """The files of a checkpoint directory that `rank` fsyncs before the commit barrier: those named
    for it, and every file named for no rank (fsync flushes only the writing node's cache, and any
    rank may have written such a file). With N ranks each fsyncs a few files, not all 2N + 1."""
    def owner(path: Path) -> int | None:
        for pattern in _RANK_FILE_PATTERNS:
            found = pattern.search(path.name)
            if found:
                return int(found.group(1))
        return None
    return [path for path in paths if owner(path) in (None, rank)]



def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and, on CUDA, this rank's device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise ValueError("the checkpoint was written without CUDA RNG state; resume it on the device type "
                             "it was written on")
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointManager:
    """Saves and finds checkpoints under `root` (see the module docstring)."""

    def __init__(self, root: str | Path, *, keep_last: int, rank: int, world_size: int) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def client_file(self, tag: str) -> Path:
        return self.root / tag / f"client_rank{self.rank:05d}.pt"

    def prepare(self) -> None:
        """Create the folder and clear what a killed run left (collective): a temporary directory
        holding a complete checkpoint whose tag is missing (killed between the two renames of a
        rewrite) is renamed into place, the newer attempt before the stale one; the rest is removed."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in sorted(self.root.glob(f"{TMP_PREFIX}*"), key=lambda path: "stale_" in path.name):
                tag = leftover.name.removeprefix(TMP_PREFIX).removeprefix("stale_")
                if (tag.startswith(TAG_PREFIX) and (leftover / "meta.json").is_file()
                        and not (self.root / tag).exists()):
                    os.rename(leftover, self.root / tag)
                elif leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        distributed.barrier()

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint, or None when there is none. `latest` names it, unless a
        kill came between a checkpoint's rename and the pointer's update (then it names an older
        one, or none, or a tag that was being rewritten)."""
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        complete = self.tags()
        if not complete:
            if named is not None:
                raise ValueError(f"{pointer} names checkpoint '{named}', but {self.root / named}/meta.json does "
                                 "not exist and there is no other complete checkpoint")
            return None
        if named != complete[-1]:
            print(f"[checkpoint] {pointer} names {named!r}; the newest complete checkpoint is {complete[-1]}",
                  file=sys.stderr, flush=True)
        return complete[-1]

    def read_meta(self, tag: str) -> dict[str, Any]:
        return json.loads((self.root / tag / "meta.json").read_text())

    def save(self, step: int, *, write_engine: Callable[[Path, str], None], client_state: dict[str, Any],
             meta: dict[str, Any]) -> str:
        """Write checkpoint `step` atomically (collective: every rank calls it).

        write_engine(root, tag): writes the engine files of this rank into root/tag (DeepSpeed's
        `engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=True)`).
        client_state: this rank's trainer state. meta: JSON-able facts rank 0 records.
        Returns the final tag.
        """
        tag = tag_for_step(step)
        tmp_tag = f"{TMP_PREFIX}{tag}"
        tmp_dir = self.root / tmp_tag
        write_engine(self.root, tmp_tag)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, self.client_file(tmp_tag))
        # on disk before any rank moves on (survives a crashed node)
        for path in files_to_sync([path for path in tmp_dir.rglob("*") if path.is_file()], self.rank):
            fsync_file(path)
        distributed.barrier()  # every rank's files are in tmp_dir
        if self.rank == 0:
            atomic_write_text(tmp_dir / "meta.json", json.dumps(
                {**meta, "step": step, "world_size": self.world_size, "time": time.time()}, indent=1))
            final_dir = self.root / tag
            stale = self.root / f"{TMP_PREFIX}stale_{tag}"
            if final_dir.exists():  # an earlier attempt at this step: moved aside, deleted once replaced
                os.rename(final_dir, stale)
            os.rename(tmp_dir, final_dir)
            fsync_dir(self.root)
            shutil.rmtree(stale, ignore_errors=True)
            atomic_write_text(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is not complete
        return tag

    def load_client_state(self, tag: str) -> dict[str, Any]:
        """This rank's trainer state from checkpoint `tag`; ValueError if the world size differs."""
        meta = self.read_meta(tag)
        if meta["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {self.root / tag} was written by {meta['world_size']} ranks, this run has "
                             f"{self.world_size}: exact resume needs the same number of ranks (or start a new "
                             f"train.output_dir / set checkpoint.resume false)")
        path = self.client_file(tag)
        if not path.is_file():
            raise ValueError(f"checkpoint {self.root / tag} has no trainer state for rank {self.rank} ({path.name})")
        # our own file: holds numpy/python RNG states, so not weights-only
        return torch.load(path, map_location="cpu", weights_only=False)

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        found = [p.name for p in self.root.glob(f"{TAG_PREFIX}*") if (p / "meta.json").is_file()]
        return sorted(found)

    def _prune(self, *, keep: str) -> None:
        complete = self.tags()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
