"""LoRA on the image encoder's attention `qkv` projections, through peft.

Adapters go on `image_encoder.blocks.{i}.attn.qkv` for every block i >= start_block; every other
parameter is frozen. peft's default initialisation (A random, B zero) leaves the model's output
unchanged until training moves B.

One adapter per fused qkv Linear, as SPEC.md's Model section words it: its rank-r A is shared by
q, k and v, and B (3 x dim rows) adapts all three. The SAMed / PointSAM lineage (SPEC's "rank 4 on
q, v") puts two independent rank-r adapters on q and v and leaves k frozen: the same parameter
count (2 x r x (dim + dim) against r x (dim + 3 dim)), another function class.

Adapter folder format (written by `save_adapter`, read by `load_adapter`):
- `adapter_config.json`: peft's `LoraConfig` (r, lora_alpha, lora_dropout, target_modules, ...).
- `adapter_model.safetensors`: the LoRA tensors, keyed like `lora_state_dict` (module path +
  `lora_A.weight` / `lora_B.weight`, without peft's adapter name).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from resam_dist.durable import fsync_dir, fsync_file
from resam_dist.model.sam import PromptableSam

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The key prefix of peft's adapter files (`PeftModel.save_pretrained`): the weights live under the
# PeftModel's `base_model` (the LoRA tuner) and its `model` (the wrapped PromptableSam)
PEFT_KEY_PREFIX = "base_model.model."
_TARGET_PATTERN = re.compile(r"image_encoder\.blocks\.(\d+)\.attn\.qkv")


def lora_targets(model: PromptableSam, start_block: int) -> list[str]:
    """Names of the qkv Linear modules of encoder blocks start_block .. depth-1."""
    depth = len(model.image_encoder.blocks)
    if not 0 <= start_block < depth:
        raise ValueError(f"lora start_block must lie in [0, {depth - 1}] for an encoder of {depth} blocks, "
                         f"got {start_block}")
    return [f"image_encoder.blocks.{i}.attn.qkv" for i in range(start_block, depth)]


def has_lora(model: PromptableSam) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def apply_lora(model: PromptableSam, *, rank: int, alpha: float, dropout: float, start_block: int,
               seed: int | None = None) -> PromptableSam:
    """Inject LoRA (in place) into the qkv of encoder blocks >= start_block and freeze everything else.

    rank >= 1; scale = alpha / rank; dropout in [0, 1) on the adapter input (off in eval mode).
    seed: seeds the LoRA A initialisation without touching the global RNG (None: global RNG).
    Returns the same model object.
    """
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must lie in [0, 1), got {dropout}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=lora_targets(model, start_block), bias="none")
    if seed is None:
        _inject(model, config)
    else:
        with torch.random.fork_rng(devices=[]):  # restores the CPU generator only, so seed only that
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed every CUDA device)
            _inject(model, config)
    return model


def _inject(model: PromptableSam, config: LoraConfig) -> None:
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_state_dict(model: PromptableSam) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, keyed `<module path>.lora_A.weight` / `.lora_B.weight` (detached,
    sharing storage with the model)."""
    marker = f".{ADAPTER_NAME}."
    return {name.replace(marker, "."): tensor.detach()
            for name, tensor in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def save_adapter(model: PromptableSam, directory: str | Path) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `directory`, atomically: both
    go into `<directory>.tmp` first, which then replaces `directory` (an earlier adapter there is
    moved aside and deleted). A process killed on the way leaves the earlier adapter or none, never
    a folder with one file of the two (an adapter_config.json marks a finished run for the demo
    and `resam-eval`)."""
    directory = Path(directory)
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed writer
    staging.mkdir()
    model.peft_config[ADAPTER_NAME].save_pretrained(str(staging))
    # peft's key layout, so that `PeftModel.from_pretrained(build_sam(...), directory)` loads it too
    tensors = {PEFT_KEY_PREFIX + name: tensor.contiguous().cpu() for name, tensor in lora_state_dict(model).items()}
    save_file(tensors, str(staging / WEIGHTS_FILE))
    for written in staging.iterdir():  # on disk before the renames publish them
        fsync_file(written)
    fsync_dir(staging)
    earlier = directory.with_name(directory.name + ".old")
    shutil.rmtree(earlier, ignore_errors=True)  # left by a writer killed between the renames
    if directory.exists():
        directory.rename(earlier)
    staging.rename(directory)
    fsync_dir(directory.parent)
    shutil.rmtree(earlier, ignore_errors=True)
    return directory


def load_adapter(model: PromptableSam, directory: str | Path) -> PromptableSam:
    """Load an adapter folder (this module's or peft's `PeftModel.save_pretrained`) into `model`
    (in place).

    A model without adapters gets them injected first, with the saved rank/alpha/dropout/targets;
    a model with adapters must have the same targets and rank. Keys and shapes must match
    exactly (ValueError naming the file otherwise). Returns the same model object.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"adapter file {path} does not exist")
    config = _read_config(config_path, model)
    if has_lora(model):
        current = model.peft_config[ADAPTER_NAME]
        if (set(current.target_modules) != set(config.target_modules) or current.r != config.r
                or current.lora_alpha != config.lora_alpha):
            raise ValueError(f"adapter {config_path} (rank {config.r}, alpha {config.lora_alpha}, "
                             f"{len(config.target_modules)} targets) does not match the model's adapters "
                             f"(rank {current.r}, alpha {current.lora_alpha}, {len(current.target_modules)} targets)")
    else:
        _inject(model, config)

    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"adapter weights {weights_path} could not be read: {error}") from error
    # peft's layout (written by save_adapter and PeftModel.save_pretrained), or unprefixed (written
    # by save_adapter before it took peft's layout)
    tensors = {key.removeprefix(PEFT_KEY_PREFIX): tensor for key, tensor in tensors.items()}
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(key for key in set(expected) & set(tensors)
                         if tuple(tensors[key].shape) != tuple(expected[key].shape))
    if missing or unexpected or wrong_shape:
        raise ValueError(f"adapter weights {weights_path} do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return model


def _read_config(path: Path, model: PromptableSam) -> LoraConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"adapter config {path} could not be read: {error}") from error
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"adapter config {path} is not a LoRA config (peft_type={raw.get('peft_type')!r})")
    config = LoraConfig.from_pretrained(str(path.parent))
    targets = sorted(config.target_modules or [])
    depth = len(model.image_encoder.blocks)
    bad = [t for t in targets if not (m := _TARGET_PATTERN.fullmatch(t)) or int(m.group(1)) >= depth]
    if not targets or bad:
        raise ValueError(f"adapter config {path} targets modules this {depth}-block model lacks: {bad or targets}")
    config.target_modules = targets
    return config


def merge_lora(model: PromptableSam, *, inplace: bool = False) -> PromptableSam:
    """Fold the adapters into the qkv weights and return a plain PromptableSam (official state-dict
    layout, every parameter trainable again as after `build_sam`), e.g. for export. By default the
    given model is left untouched (a copy is merged)."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to merge")
    merged = model if inplace else copy.deepcopy(model)
    lora_names = [name for name, module in merged.named_modules() if isinstance(module, LoraLayer)]
    for name in lora_names:
        parent_name, _, child_name = name.rpartition(".")
        parent = merged.get_submodule(parent_name)
        lora_module = getattr(parent, child_name)
        lora_module.merge(safe_merge=True)
        setattr(parent, child_name, lora_module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged
