"""DALI training pipeline: WebDataset shards -> weak/strong views, masks, prompts -> `Batch`.

One pipeline per rank and per epoch. The reader takes shard `(rank + epoch) % world` of the
samples (DALI's contiguous split; the shift emulates DALI's own shard rotation between epochs),
shuffles them in a seeded buffer and pads the last batch by repeating a sample, so every rank
gets `len(loader)` batches per epoch. Per sample:

    image.png  --decode (mixed on GPU / cpu)--> resize longest side to S (linear) -> flip -> weak
    weak       --photometric set (each op at random)--> strong
    labels.png --decode--> resize (nearest) -> the same flip -> instance masks
    prompts.f32, boxes.f32 --scale by the resize factors, mirror with the flip--> points, boxes
    weak, strong --SAM mean/std normalisation, then zero padding to S x S (bottom/right)

Flips: horizontal and vertical, each with probability 1/2 (overhead imagery has no "up").
Photometric set of the strong view, each with probability 1/2: equalize, posterize (keep 4-6
bits), solarize (threshold 160-240), sharpen (3x3 kernel, strength 0.3-1), shadow-like darkening
(a smooth random field thresholded into soft dark patches, up to 60 % darker); brightness and
contrast (x0.7-1.3 each) always, so that the strong view always differs from the weak one.

Determinism: the reader order of epoch e is seeded from (data.seed, epoch_seed_offset, e), every
random operator from (data.seed, epoch_seed_offset, e, rank) with explicit per-operator seeds;
the same seeds give the same batches, bit for bit, and the CPU and GPU pipelines draw alike.
Resume: `start_position` counts the batch slots this rank has consumed (padding duplicates
included, always a multiple of the batch size). Resuming rebuilds the pipeline of that epoch and
runs and discards the batches already consumed in it: DALI readers cannot seek. The cost is at
most one epoch of loading (the loader is several times faster than training, see
benchmarks/bench_loader.py); whole earlier epochs cost nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

import numpy as np
import torch

from resam_dist.config import Config
from resam_dist.data.batch import Batch
from resam_dist.distributed import cuda_device_index
from resam_dist.model.build import PIXEL_MEAN, PIXEL_STD   # SAM's, on the 0-255 scale

READER_NAME = "Reader"
COMPONENTS = ("image.png", "labels.png", "prompts.f32", "boxes.f32")
POINTS_PER_SIGN = 3   # prompts.f32 holds 3 positive then 3 negative (x, y, label) per instance
_ROW_BYTES = {"prompts.f32": 2 * POINTS_PER_SIGN * 3 * 4, "boxes.f32": 4 * 4}  # float32 bytes per instance
_OUTPUTS = ("weak", "strong", "labels", "points", "point_labels", "boxes", "num_prompts", "num_boxes",
            "image_hw", "labels_hw", "resized_hw", "source")


# --------------------------------------------------------------------------------------------
# Shard discovery and validation
# --------------------------------------------------------------------------------------------

class ShardError(ValueError):
    """A shard is missing, truncated or corrupt; the message names the file."""


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    num_samples: int                 # from the index file
    size_bytes: int | None = None    # from the manifest (None: not recorded)
    sha256: str | None = None        # from the manifest (None: not recorded)


def _expand_braces(pattern: str) -> list[str]:
    """`train-{000000..000003}.tar` -> the four names (zero padding kept); no braces: [pattern]."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    names = []
    for number in range(int(first), int(last) + 1):
        names.extend(_expand_braces(pattern[:match.start()] + str(number).zfill(width) + pattern[match.end():]))
    return names


def _read_index(path: Path, tar: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI webdataset index (v1.1/v1.2): per sample, extension -> (offset, size)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ShardError(f"shard {tar}: index file {path} not found (run resam-prep or DALI's wds2idx)") from None
    except UnicodeDecodeError:
        raise ShardError(f"shard {tar}: index file {path} is not a text index (corrupt? recreate it with "
                         "resam-prep or DALI's wds2idx)") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v1.") or not header[1].isdigit():
        raise ShardError(f"shard {tar}: index file {path} has no valid header ('v1.2 <samples>'), got {lines[:1]}")
    fields_per_component = 4 if header[0] == "v1.2" else 3
    samples = []
    for line_number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) % fields_per_component:
            raise ShardError(f"shard {tar}: index file {path} line {line_number} is malformed")
        components = {}
        for i in range(0, len(parts), fields_per_component):
            offset, size = parts[i + 1], parts[i + 2]
            if not (offset.isdigit() and size.isdigit()):
                raise ShardError(f"shard {tar}: index file {path} line {line_number}: component {parts[i]!r} has "
                                 f"offset {offset!r} and size {size!r}, not non-negative integers")
            components[parts[i]] = (int(offset), int(size))
        samples.append(components)
    if len(samples) != int(header[1]):
        raise ShardError(f"shard {tar}: index file {path} lists {len(samples)} samples, its header says {header[1]}")
    return samples


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[Shard]:
    """The shards of `data.train_shards`: a folder with manifest.json (resam-prep), a list of tar
    paths, a single tar path or a brace pattern (`train-{000000..000007}.tar`). Index files are
    listed in the manifest, else they sit next to the tars with the suffix `.idx`."""
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        folder = Path(spec)
        manifest_path = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{folder}: no manifest.json (write the shards with resam-prep)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path}: not valid JSON ({err})") from None
        entries = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{manifest_path}: key 'shards' must be a non-empty list")
        shards = []
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or "tar" not in entry:
                raise ValueError(f"{manifest_path}: shards[{number}] must be an object with key 'tar'")
            tar = folder / entry["tar"]
            index = folder / entry["idx"] if "idx" in entry else tar.with_suffix(".idx")
            samples = _read_index(index, tar) if tar.exists() else None
            if samples is None:
                raise ShardError(f"shard {tar} (listed in {manifest_path}) not found")
            if "samples" in entry and entry["samples"] != len(samples):
                raise ShardError(f"shard {tar}: manifest lists {entry['samples']} samples, index {index} has "
                                 f"{len(samples)}")
            shards.append(Shard(tar=tar, index=index, num_samples=len(samples),
                                size_bytes=entry.get("bytes"), sha256=entry.get("sha256")))
        return shards
    names = _expand_braces(str(spec)) if isinstance(spec, (str, Path)) else [str(s) for s in spec]
    if not names or names == [""]:
        raise ValueError("data.train_shards is empty: give a shard folder (manifest.json) or tar paths")
    shards = []
    for name in names:
        tar = Path(name)
        if not tar.is_file():
            raise ShardError(f"shard {tar} not found")
        index = tar.with_suffix(".idx")
        shards.append(Shard(tar=tar, index=index, num_samples=len(_read_index(index, tar))))
    return shards


def validate_shards(shards: Sequence[Shard], *, verify_checksums: bool = False) -> None:
    """Quick checks before the pipeline is built, raising `ShardError` naming the shard:
    the tar exists, has the size the manifest recorded (and its sha256 when `verify_checksums`),
    every sample of its index has all components, every component lies inside the file, and the
    float32 components hold whole instance rows, as many in prompts.f32 as in boxes.f32."""
    import hashlib

    for shard in shards:
        if not shard.tar.is_file():
            raise ShardError(f"shard {shard.tar} not found")
        size = shard.tar.stat().st_size
        if shard.size_bytes is not None and size != shard.size_bytes:
            raise ShardError(f"shard {shard.tar} is {size} bytes, the manifest recorded {shard.size_bytes} "
                             "(truncated or rewritten; re-run resam-prep)")
        samples = _read_index(shard.index, shard.tar)
        for number, components in enumerate(samples):
            missing = [ext for ext in COMPONENTS if ext not in components]
            if missing:
                raise ShardError(f"shard {shard.tar}: sample {number} of index {shard.index} lacks {missing}")
            for ext, (offset, length) in components.items():
                if offset < 0 or length < 0 or offset + length > size:
                    raise ShardError(f"shard {shard.tar} is truncated: sample {number} component {ext} ends at "
                                     f"byte {offset + length}, the file has {size} bytes")
            instances = {}  # the instance count each float32 component implies
            for ext, row_bytes in _ROW_BYTES.items():
                length = components[ext][1]
                if length % row_bytes:
                    raise ShardError(f"shard {shard.tar}: sample {number} component {ext} has {length} bytes, not "
                                     f"a whole number of {row_bytes}-byte instance rows")
                instances[ext] = length // row_bytes
            if len(set(instances.values())) > 1:
                raise ShardError(f"shard {shard.tar}: sample {number} holds {instances['prompts.f32']} instances in "
                                 f"prompts.f32 and {instances['boxes.f32']} in boxes.f32")
        if verify_checksums and shard.sha256 is not None:
            digest = hashlib.sha256()
            with open(shard.tar, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != shard.sha256:
                raise ShardError(f"shard {shard.tar}: sha256 {digest.hexdigest()} differs from the manifest's "
                                 f"{shard.sha256} (corrupt; re-run resam-prep)")


def find_corrupt_sample(shards: Sequence[Shard]) -> str | None:
    """Slow diagnosis after a pipeline failure: decode every sample with PIL/numpy and return a
    message naming the first broken shard and sample, or None when all samples are fine."""
    import io

    from PIL import Image

    for shard in shards:
        samples = _read_index(shard.index, shard.tar)
        with open(shard.tar, "rb") as f:
            for number, components in enumerate(samples):
                for ext in COMPONENTS:
                    offset, length = components[ext]
                    f.seek(offset)
                    data = f.read(length)
                    try:
                        if ext.endswith(".png"):
                            with Image.open(io.BytesIO(data)) as image:
                                image.load()
                        elif length % 4:
                            raise ValueError(f"{length} bytes is not a whole number of float32")
                    except Exception as err:  # noqa: BLE001 - any decoding failure is the diagnosis
                        return f"shard {shard.tar}: sample {number} component {ext} is corrupt ({err})"
    return None


# --------------------------------------------------------------------------------------------
# The DALI graph
# --------------------------------------------------------------------------------------------

def _epoch_seed(*parts: int) -> int:
    """A 31-bit seed mixed from non-negative integers (DALI seeds are int32)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class _SeedStream:
    """Explicit seeds for the random operators, in graph order: the same draws on the CPU and the
    GPU pipeline, whatever seeds DALI would assign by itself."""

    def __init__(self, seed: int):
        self._seeds = iter(np.random.SeedSequence(seed).generate_state(64))

    def __call__(self) -> int:
        return int(next(self._seeds) & 0x7FFFFFFF)


def _photometric(image, *, resized_hw, on_gpu: bool, seeds: _SeedStream):
    """Strong-view distortions of a uint8 HWC image (after geometry, before normalisation)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    def dev(node):  # per-sample scalars and small tensors are made on the CPU
        return node.gpu() if on_gpu else node

    def select(flag, changed, unchanged):  # uint8 blend with a 0/1 uint8 flag: no overflow
        flag = dev(flag)
        return changed * flag + unchanged * (types.Constant(1, dtype=types.UINT8) - flag)

    def coin():
        return fn.random.coin_flip(probability=0.5, dtype=types.UINT8, seed=seeds())

    image = select(coin(), fn.equalize(image), image)

    # posterize: keep the 4, 5 or 6 most significant bits (mask 0xFF when not applied)
    keep_mask = fn.random.choice(types.Constant(np.array([0xF0, 0xF8, 0xFC], dtype=np.uint8)), seed=seeds())
    posterize = coin()
    keep_mask = keep_mask * posterize + types.Constant(0xFF, dtype=types.UINT8) * (
        types.Constant(1, dtype=types.UINT8) - posterize)
    image = image & dev(keep_mask)

    # solarize: invert the pixels at or above a threshold (x ^ 255 == 255 - x for uint8)
    threshold = dev(fn.random.uniform(range=[160.0, 240.0], seed=seeds()))
    invert = fn.cast(image >= threshold, dtype=types.UINT8) * dev(coin())
    image = image ^ (invert * types.Constant(255, dtype=types.UINT8))

    # sharpen: per-sample kernel identity + strength * (sharpen - identity); identity when off
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1.0
    laplace = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float32)
    strength = fn.random.uniform(range=[0.3, 1.0], seed=seeds()) * fn.cast(coin(), dtype=types.FLOAT)
    kernel = types.Constant(identity) + strength * types.Constant(laplace)   # 3 x 3 float32
    image = fn.filter(image, kernel, border="clamp", dtype=types.UINT8)

    image = fn.brightness_contrast(image, brightness=fn.random.uniform(range=[0.7, 1.3], seed=seeds()),
                                   contrast=fn.random.uniform(range=[0.7, 1.3], seed=seeds()),
                                   contrast_center=128.0)

    # shadow-like darkening: a 4 x 4 random field, smoothly upsampled, thresholded into soft patches
    field = fn.reshape(fn.random.uniform(range=[0.0, 1.0], shape=[4, 4, 1], seed=seeds()), layout="HWC")
    field = fn.resize(dev(field), size=resized_hw, interp_type=types.INTERP_LINEAR, antialias=False)
    patches = dmath.clamp((field - 0.55) * 5.0, 0.0, 1.0)                      # h x w x 1 in [0, 1]
    darkness = fn.random.uniform(range=[0.3, 0.6], seed=seeds()) * fn.cast(coin(), dtype=types.FLOAT)
    shaded = fn.cast(image, dtype=types.FLOAT) * (1.0 - dev(darkness) * patches)
    return fn.cast(dmath.clamp(shaded, 0.0, 255.0), dtype=types.UINT8)


def _define_graph(*, shards: Sequence[Shard], image_size: int, num_points: int, shard_id: int, num_shards: int,
                  shuffle: bool, shuffle_buffer: int, reader_seed: int, augment_seed: int, on_gpu: bool):
    """The per-sample graph; returns the outputs named in `_OUTPUTS`."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    def dev(node):
        return node.gpu() if on_gpu else node

    image_png, labels_png, prompts_raw, boxes_raw = fn.readers.webdataset(
        paths=[str(s.tar) for s in shards], index_paths=[str(s.index) for s in shards], ext=list(COMPONENTS),
        dtypes=[types.UINT8, types.UINT8, types.FLOAT, types.FLOAT], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, random_shuffle=shuffle,
        initial_fill=shuffle_buffer, seed=reader_seed, name=READER_NAME)
    source = fn.get_property(image_png, key="source_info")   # "<tar>:<offset>:<key>.image.png" bytes

    # geometry: SAM's ResizeLongestSide sizes, computed from the encoded headers (CPU scalars)
    image_hw = fn.peek_image_shape(image_png)[0:2]       # 2 int64 (h, w) of the tile
    labels_hw = fn.peek_image_shape(labels_png)[0:2]
    height = fn.cast(image_hw[0], dtype=types.FLOAT)
    width = fn.cast(image_hw[1], dtype=types.FLOAT)
    scale = image_size / dmath.max(height, width)
    new_height = dmath.max(dmath.floor(height * scale + 0.5), 1.0)
    new_width = dmath.max(dmath.floor(width * scale + 0.5), 1.0)
    resized_hw = fn.stack(new_height, new_width)          # 2 float32, whole numbers
    seeds = _SeedStream(augment_seed)
    flip_x = fn.random.coin_flip(probability=0.5, dtype=types.INT32, seed=seeds())
    flip_y = fn.random.coin_flip(probability=0.5, dtype=types.INT32, seed=seeds())

    decode_device = "mixed" if on_gpu else "cpu"
    image = fn.decoders.image(image_png, device=decode_device, output_type=types.RGB)   # h x w x 3 uint8
    image = fn.resize(image, size=resized_hw, interp_type=types.INTERP_LINEAR, antialias=True)
    image = fn.flip(image, horizontal=flip_x, vertical=flip_y)
    labels = fn.decoders.image(labels_png, device=decode_device, output_type=types.RGB)
    labels = fn.resize(labels, size=resized_hw, interp_type=types.INTERP_NN, antialias=False)
    labels = fn.flip(labels, horizontal=flip_x, vertical=flip_y)
    labels = fn.crop(labels, crop=(image_size, image_size), crop_pos_x=0.0, crop_pos_y=0.0,
                     out_of_bounds_policy="pad", fill_values=0)
    labels = fn.transpose(labels, perm=[2, 0, 1])          # 3 x S x S uint8

    strong = _photometric(image, resized_hw=resized_hw, on_gpu=on_gpu, seeds=seeds)

    def normalise(view):  # SAM: normalise, then zero padding (bottom/right) to S x S, CHW float32
        return fn.crop_mirror_normalize(view, crop=(image_size, image_size), crop_pos_x=0.0, crop_pos_y=0.0,
                                        out_of_bounds_policy="pad", fill_values=0.0, mean=list(PIXEL_MEAN),
                                        std=list(PIXEL_STD), output_layout="CHW", dtype=types.FLOAT)

    weak = normalise(image)
    strong = normalise(strong)

    # prompts: K x 6 x 3 -> first num_points positives and negatives -> scale and mirror
    # (a slice of a K x 2 x 3 x 3 view rather than fn.cat, which loses extents when all K are 0)
    prompts = fn.reshape(prompts_raw, shape=[-1, 2, POINTS_PER_SIGN, 3])   # K x (pos, neg) x 3 x 3
    chosen = fn.reshape(prompts[:, :, 0:num_points, :], shape=[-1, 2 * num_points, 3])   # K x 2N x 3
    scale_x, scale_y = new_width / width, new_height / height
    flip_xf, flip_yf = fn.cast(flip_x, dtype=types.FLOAT), fn.cast(flip_y, dtype=types.FLOAT)
    xs = chosen[:, :, 0] * scale_x
    ys = chosen[:, :, 1] * scale_y
    xs = xs + flip_xf * (new_width - 2.0 * xs)            # mirrored: x' = w - x
    ys = ys + flip_yf * (new_height - 2.0 * ys)
    points = fn.stack(xs, ys, axis=2)                     # K x 2N x 2
    point_labels = fn.cast(chosen[:, :, 2], dtype=types.INT32)

    boxes = fn.reshape(boxes_raw, shape=[-1, 4])          # K x 4 (x0, y0, x1, y1), x1/y1 exclusive
    x0, y0 = boxes[:, 0] * scale_x, boxes[:, 1] * scale_y
    x1, y1 = boxes[:, 2] * scale_x, boxes[:, 3] * scale_y
    # mirrored: (x0, x1) -> (w - x1, w - x0); both move by w - x0 - x1
    shift_x, shift_y = flip_xf * (new_width - x0 - x1), flip_yf * (new_height - y0 - y1)
    boxes = fn.stack(x0 + shift_x, y0 + shift_y, x1 + shift_x, y1 + shift_y, axis=1)   # K x 4

    # variable instance counts: pad K to the batch maximum
    points = fn.pad(points, axes=(0,), fill_value=0.0)
    point_labels = fn.pad(point_labels, axes=(0,), fill_value=-1)
    boxes = fn.pad(boxes, axes=(0,), fill_value=0.0)
    num_prompts = prompts.shape()[0:1]
    num_boxes = boxes_raw.shape()[0:1]                     # floats: 4 per box
    resized_hw_int = fn.cast(resized_hw, dtype=types.INT64)
    source = fn.pad(source, axes=(0,), fill_value=0)
    return (weak, strong, labels, dev(points), dev(point_labels), dev(boxes), num_prompts, num_boxes,
            image_hw, labels_hw, resized_hw_int, source)


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------

def _labels_to_masks(labels: torch.Tensor, counts: torch.Tensor, num_instances: int) -> torch.Tensor:
    """labels B x 3 x S x S uint8 (layer c holds k + 1 on instance k) -> B x K x S x S bool;
    label values above counts[b] are ignored, so instances k >= counts[b] are all False.

    One scatter per pixel and layer (not K comparisons per pixel): instance k goes to channel
    k - 1, background to an extra last channel that is cut off (the result is a view)."""
    batch, layers, height, width = labels.shape
    ids = labels.reshape(batch, layers, height * width).long()                      # B x 3 x SS
    ids = torch.where(ids > counts.view(batch, 1, 1), 0, ids)
    channels = torch.remainder(ids - 1, num_instances + 1)                          # 0 (background) -> K
    masks = torch.zeros(batch, num_instances + 1, height * width, dtype=torch.bool, device=labels.device)
    masks.scatter_(1, channels, True)
    return masks[:, :num_instances].view(batch, num_instances, height, width)      # B x K x S x S


class TrainLoader:
    """Iterable over the batches of one epoch per `iter()` call (the next epoch each time).

    `len(loader)`: batches per epoch per rank (equal on all ranks). `position`: batch slots this
    rank has consumed since the start of training; `epoch`: the epoch the next `iter()` serves.
    """

    def __init__(self, *, shards: list[Shard], image_size: int, batch_size: int, num_points: int, rank: int,
                 world_size: int, device: torch.device, seed: int, shuffle: bool, shuffle_buffer: int,
                 num_threads: int, prefetch: int, start_position: int = 0):
        for name, value in (("data.shuffle_buffer", shuffle_buffer), ("data.reader_threads", num_threads),
                            ("data.prefetch_batches", prefetch), ("train.images_per_rank", batch_size)):
            if value < 1:
                raise ValueError(f"key '{name}' must be positive, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if num_points not in (1, 2, 3):
            raise ValueError(f"data.num_points must be 1, 2 or 3, got {num_points}")
        if start_position < 0 or start_position % batch_size:
            raise ValueError(f"start_position {start_position} must be a non-negative multiple of the batch size "
                             f"{batch_size} (it counts the batch slots this rank consumed)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        self.shards = shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_points = num_points
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.num_samples = sum(s.num_samples for s in shards)
        if self.num_samples < world_size:
            raise ValueError(f"{self.num_samples} samples cannot be split over {world_size} ranks")
        # DALI splits N samples into contiguous shards of floor/ceil(N / W); padding brings every
        # rank to the largest one, rounded up to whole batches
        self._batches_per_epoch = math.ceil(math.ceil(self.num_samples / world_size) / batch_size)
        self.position = start_position

    def __len__(self) -> int:
        return self._batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Batch slots per epoch per rank (real samples plus padding duplicates)."""
        return self._batches_per_epoch * self.batch_size

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    def _build_pipeline(self, epoch: int):
        from nvidia.dali import pipeline_def

        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        graph = pipeline_def(_define_graph, batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=device_id, prefetch_queue_depth=self.prefetch,
                             seed=_epoch_seed(self.seed, 1, epoch, self.rank))
        pipe = graph(shards=self.shards, image_size=self.image_size, num_points=self.num_points,
                     shard_id=(self.rank + epoch) % self.world_size, num_shards=self.world_size,
                     shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer,
                     reader_seed=_epoch_seed(self.seed, 2, epoch),
                     augment_seed=_epoch_seed(self.seed, 3, epoch, self.rank), on_gpu=on_gpu)
        pipe.build()
        return pipe

    def _pipeline_error(self, err: RuntimeError) -> Exception:
        """A DALI failure re-raised naming the shard: from DALI's message (it names the sample's
        source), else, for a reading/decoding failure, by a diagnosis scan of all shards; any other
        failure (e.g. out of memory) is returned unchanged."""
        message = str(err)
        for shard in self.shards:
            if str(shard.tar) in message:
                lines = [line.strip() for line in message.splitlines() if str(shard.tar) in line]
                return ShardError(f"shard {shard.tar} is corrupt: {lines[0]}")
        if not re.search(r"decod|webdataset|Reader|index|tar", message, flags=re.IGNORECASE):
            return err
        diagnosis = find_corrupt_sample(self.shards)
        if diagnosis is not None:
            return ShardError(diagnosis)
        listed = ", ".join(str(s.tar) for s in self.shards[:3]) + (", ..." if len(self.shards) > 3 else "")
        return ShardError(f"the DALI reader failed on shards {listed} (all samples decode with PIL): {message}")

    def _reraise(self, err: RuntimeError) -> NoReturn:
        error = self._pipeline_error(err)
        if error is err:
            raise err
        raise error from err

    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        epoch = self.epoch
        skip = (self.position - epoch * self.samples_per_epoch) // self.batch_size
        try:
            pipe = self._build_pipeline(epoch)
            iterator = DALIGenericIterator(pipe, list(_OUTPUTS), reader_name=READER_NAME,
                                           last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
        except RuntimeError as err:
            self._reraise(err)
        assert len(iterator) == self._batches_per_epoch, (len(iterator), self._batches_per_epoch)
        for index in range(self._batches_per_epoch):
            try:
                outputs = next(iterator)[0]
            except RuntimeError as err:
                self._reraise(err)
            if index < skip:   # resume: fast-forward through the batches consumed before
                continue
            self.position += self.batch_size
            yield self._to_batch(outputs)
        del iterator, pipe

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        keys = []
        for row in out["source"].cpu().numpy():
            text = bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")
            name = text.rsplit(":", 2)[-1]
            keys.append(name[: -len(".image.png")] if name.endswith(".image.png") else name)
        num_prompts = out["num_prompts"].view(-1).cpu()
        num_boxes = out["num_boxes"].view(-1).cpu() // 4
        image_hw, labels_hw = out["image_hw"].cpu(), out["labels_hw"].cpu()
        for b, key in enumerate(keys):
            if num_prompts[b] != num_boxes[b]:
                raise ValueError(f"sample {key}: prompts.f32 holds {int(num_prompts[b])} instances, boxes.f32 "
                                 f"{int(num_boxes[b])}")
            if not torch.equal(image_hw[b], labels_hw[b]):
                raise ValueError(f"sample {key}: labels.png is {labels_hw[b].tolist()} but image.png is "
                                 f"{image_hw[b].tolist()}")
        device = self.device
        counts = num_prompts.to(torch.int64).to(device, non_blocking=True)           # B
        points = out["points"].to(device, non_blocking=True)                         # B x K x 2N x 2
        num_instances = points.shape[1]
        labels = out["labels"]                                                       # B x 3 x S x S uint8
        return Batch(
            weak=out["weak"],                                                        # B x 3 x S x S
            strong=out["strong"],                                                    # B x 3 x S x S
            gt_masks=_labels_to_masks(labels, counts, num_instances),                # B x K x S x S
            points=points,
            point_labels=out["point_labels"].to(device, torch.int64, non_blocking=True),   # B x K x 2N
            boxes=out["boxes"].to(device, non_blocking=True),                        # B x K x 4
            counts=counts,
            image_sizes=out["resized_hw"].to(device, torch.int64, non_blocking=True),      # B x 2 (h, w)
            keys=keys,
            position=self.position,
        )


def build_train_loader(cfg: Config, *, image_size: int, rank: int, world_size: int, local_rank: int,
                       device: torch.device, start_position: int = 0, epoch_seed_offset: int = 0,
                       verify_checksums: bool = False) -> TrainLoader:
    """The training loader of one rank: yields `Batch`es of `cfg.train.images_per_rank` images
    with `cfg.data.num_points` positive and negative points per instance, on `device` (a CUDA
    device runs the DALI pipeline on GPU `device.index`, else the local rank's, as
    `distributed.cuda_device_index` picks it; a CPU device runs it on
    the CPU). `start_position`: batch slots this rank already consumed (from a checkpoint).
    `epoch_seed_offset` shifts the data order and augmentation streams (a different run seed
    without editing the config). Shards are validated first (sizes, index; sha256 when
    `verify_checksums`)."""
    spec = cfg.data.train_shards
    if not spec:
        raise ValueError(f"{cfg.source or '<config>'}: key 'data.train_shards' is empty")
    shards = resolve_shards(spec)
    validate_shards(shards, verify_checksums=verify_checksums)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
    return TrainLoader(shards=shards, image_size=image_size, batch_size=cfg.train.images_per_rank,
                       num_points=cfg.data.num_points, rank=rank, world_size=world_size, device=device,
                       seed=_epoch_seed(cfg.data.seed, epoch_seed_offset), shuffle=cfg.data.shuffle,
                       shuffle_buffer=cfg.data.shuffle_buffer,
                       num_threads=cfg.data.reader_threads, prefetch=cfg.data.prefetch_batches,
                       start_position=start_position)
