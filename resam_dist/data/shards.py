"""resam-prep: COCO JSON + images -> tiled WebDataset shards, DALI index files and a manifest.

Each image is cut into `tile_size` tiles with `overlap` pixels of overlap (an image no larger
than a tile is one tile of its own size: nothing is upscaled). Instances are clipped to each
tile; clipped pieces below `min_area` pixels are dropped and counted. Every tile becomes one
sample with key `<image_id>_<tile_index>` (no dots: DALI groups components by the text before
the first dot) and the components of docs/ARCHITECTURE.md "Data":

    image.png    H x W x 3 uint8 tile
    labels.png   H x W x 3 uint8: channel c holds k + 1 on the pixels of instance k if k sits on
                 layer c (greedy layers: overlapping instances never share one), else 0
    prompts.f32  K x 6 x 3 little-endian float32: 3 positive then 3 negative (x, y, label)
    boxes.f32    K x 4 little-endian float32 (x0, y0, x1, y1), x1/y1 exclusive
    meta.json    image id, file name, tile index/origin/size, instance and category ids,
                 a COCO RLE per instance (counts as str)

Prompts come from `resam_dist.resam.prompts.sample_points` with a generator seeded by
(seed, image id, tile index), so the output is the same for any number of workers. Samples are
written in image order; shards roll over at `--shard-size-mb`. Every file is written under a
temporary name and renamed when complete (index before tar); `manifest.json` comes last, so
an interrupted run never leaves a complete-looking shard set.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from resam_dist.data.coco import CocoSplit, InstanceCrop, encode_rle
from resam_dist.resam.prompts import sample_points

FORMAT_VERSION = 1
POINTS_PER_SIGN = 3          # positives (and negatives) stored per instance
MAX_INSTANCES_PER_TILE = 255
NUM_LAYERS = 3
COMPONENTS = ("boxes.f32", "image.png", "labels.png", "meta.json", "prompts.f32")
PNG_COMPRESS_LEVEL = 1   # ~2x faster than 3-6 on aerial imagery for a few % more bytes

DROP_SMALL = "below_min_area"
DROP_LAYERS = "needs_more_than_3_layers"
DROP_COUNT = "more_than_255_instances"


@dataclass(frozen=True)
class TileOptions:
    tile_size: int = 1024
    overlap: int = 128
    min_area: int = 16
    keep_empty: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile size must be positive, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile size {self.tile_size}), got {self.overlap}")
        if self.min_area < 0:
            raise ValueError(f"min area must be >= 0, got {self.min_area}")
        if self.seed < 0:  # (numpy's generators take non-negative seeds only)
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class ImageResult:
    """What one image produced (computed in a worker, consumed in order by the writer)."""
    image_id: int
    samples: list[dict[str, Any]] = field(default_factory=list)   # "__key__" + COMPONENTS bytes
    tiles: int = 0
    empty_tiles: int = 0
    empty_tiles_skipped: int = 0
    instances_in: int = 0
    instances_written: int = 0
    crowd: int = 0
    empty_masks: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    file_name: str = ""
    file_sha256: str = ""


def tile_origins(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis: stride tile_size - overlap, last tile flush
    with the end; a single origin 0 when the axis is no longer than a tile."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    origins = list(range(0, length - tile_size, stride))
    origins.append(length - tile_size)
    return origins


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _clip_to_tile(crop: InstanceCrop, x0: int, y0: int, width: int, height: int) -> tuple[int, int, np.ndarray] | None:
    """The part of an instance inside the tile as (tile column, tile row, h x w mask), or None."""
    left, top = max(crop.x0, x0), max(crop.y0, y0)
    right = min(crop.x0 + crop.mask.shape[1], x0 + width)
    bottom = min(crop.y0 + crop.mask.shape[0], y0 + height)
    if right <= left or bottom <= top:
        return None
    piece = crop.mask[top - crop.y0:bottom - crop.y0, left - crop.x0:right - crop.x0]
    if not piece.any():
        return None
    return left - x0, top - y0, piece


def build_tile(image: np.ndarray, crops: list[InstanceCrop], *, image_id: int, file_name: str, tile_index: int,
               x0: int, y0: int, width: int, height: int, options: TileOptions,
               dropped: dict[str, int]) -> tuple[dict[str, Any], int]:
    """Encode one tile as a sample dict; returns (sample, K). Drops are added to `dropped`."""
    labels = np.zeros((height, width, NUM_LAYERS), dtype=np.uint8)   # H x W x 3
    kept: list[tuple[InstanceCrop, int, int, np.ndarray, int]] = []   # crop, col, row, piece, layer
    for crop in crops:
        clipped = _clip_to_tile(crop, x0, y0, width, height)
        if clipped is None:
            continue
        col, row, piece = clipped
        if int(piece.sum()) < options.min_area:
            dropped[DROP_SMALL] = dropped.get(DROP_SMALL, 0) + 1
            continue
        if len(kept) == MAX_INSTANCES_PER_TILE:
            dropped[DROP_COUNT] = dropped.get(DROP_COUNT, 0) + 1
            continue
        window = labels[row:row + piece.shape[0], col:col + piece.shape[1]]   # h x w x 3 view
        layer = next((c for c in range(NUM_LAYERS) if not window[..., c][piece].any()), None)
        if layer is None:
            dropped[DROP_LAYERS] = dropped.get(DROP_LAYERS, 0) + 1
            continue
        window[..., layer][piece] = len(kept) + 1
        kept.append((crop, col, row, piece, layer))

    num_instances = len(kept)
    prompts = np.zeros((num_instances, 2 * POINTS_PER_SIGN, 3), dtype=np.float32)   # K x 6 x 3
    boxes = np.zeros((num_instances, 4), dtype=np.float32)                           # K x 4
    rles: list[dict[str, Any]] = []
    rng = np.random.default_rng([options.seed, image_id & 0xFFFFFFFFFFFFFFFF, tile_index])
    mask = np.zeros((height, width), dtype=bool)   # H x W, one instance at a time (bounded memory)
    for k, (_, col, row, piece, _) in enumerate(kept):
        mask[:] = False
        mask[row:row + piece.shape[0], col:col + piece.shape[1]] = piece
        positives, negatives = sample_points(mask, POINTS_PER_SIGN, rng)   # 3 x 2 each
        prompts[k, :POINTS_PER_SIGN, :2] = positives
        prompts[k, :POINTS_PER_SIGN, 2] = 1.0
        prompts[k, POINTS_PER_SIGN:, :2] = negatives
        rows = np.flatnonzero(piece.any(axis=1))
        cols = np.flatnonzero(piece.any(axis=0))
        # Tight box, x1/y1 exclusive (the convention of resam_dist.resam.prompts.masks_to_boxes).
        boxes[k] = (col + cols[0], row + rows[0], col + cols[-1] + 1, row + rows[-1] + 1)
        rles.append(encode_rle(mask))
    meta = {
        "image_id": image_id,
        "file_name": file_name,
        "tile_index": tile_index,
        "tile_origin": [x0, y0],
        "tile_size": [width, height],
        "instance_ids": [int(item[0].annotation_id) for item in kept],
        "category_ids": [int(item[0].category_id) for item in kept],
        "layers": [int(item[4]) for item in kept],
        "rles": rles,
    }
    sample = {
        "__key__": f"{image_id}_{tile_index}",
        "image.png": _png_bytes(np.ascontiguousarray(image[y0:y0 + height, x0:x0 + width])),
        "labels.png": _png_bytes(labels),
        "prompts.f32": prompts.astype("<f4").tobytes(),
        "boxes.f32": boxes.astype("<f4").tobytes(),
        "meta.json": json.dumps(meta, separators=(",", ":")).encode("utf-8"),
    }
    return sample, num_instances


@dataclass
class DecodedSample:
    """A shard sample decoded back into arrays (reference reader; the trainer uses DALI)."""
    key: str
    image: np.ndarray     # H x W x 3 uint8
    masks: np.ndarray     # K x H x W bool, from labels.png
    prompts: np.ndarray   # K x 6 x 3 float32
    boxes: np.ndarray     # K x 4 float32
    meta: dict[str, Any]


def decode_sample(sample: dict[str, Any]) -> DecodedSample:
    """Decode the raw components of one sample (as read by `webdataset.WebDataset`)."""
    meta = json.loads(sample["meta.json"])
    num_instances = len(meta["instance_ids"])
    image = np.asarray(Image.open(io.BytesIO(sample["image.png"])).convert("RGB"))
    labels = np.asarray(Image.open(io.BytesIO(sample["labels.png"])))   # H x W x 3
    values = np.arange(1, num_instances + 1, dtype=np.uint8)[:, None, None, None]
    masks = (labels[None] == values).any(axis=-1)   # K x H x W
    prompts = np.frombuffer(sample["prompts.f32"], dtype="<f4").reshape(num_instances, 2 * POINTS_PER_SIGN, 3)
    boxes = np.frombuffer(sample["boxes.f32"], dtype="<f4").reshape(num_instances, 4)
    return DecodedSample(key=sample["__key__"], image=image, masks=masks, prompts=prompts, boxes=boxes, meta=meta)


def process_image(split: CocoSplit, image_id: int, options: TileOptions) -> ImageResult:
    """Tile one image into samples (pure function of the split, the id and the options)."""
    info = split.image_info(image_id)
    result = ImageResult(image_id=image_id, file_name=info["file_name"])
    path = split.image_path(image_id)
    try:
        image = split.read_image(image_id)
    except ValueError as err:
        if not split.skip_bad:
            raise
        result.skipped.append({"reason": str(err), "kind": "image", "id": image_id, "file": str(path)})
        return result
    result.file_sha256 = _sha256_file(path)
    crops, result.crowd, result.empty_masks = split.instance_crops(image_id)
    result.instances_in = len(crops)
    height, width = image.shape[:2]
    tile_height, tile_width = min(height, options.tile_size), min(width, options.tile_size)
    tile_index = 0
    for y0 in tile_origins(height, options.tile_size, options.overlap):
        for x0 in tile_origins(width, options.tile_size, options.overlap):
            sample, num_instances = build_tile(
                image, crops, image_id=image_id, file_name=info["file_name"], tile_index=tile_index,
                x0=x0, y0=y0, width=tile_width, height=tile_height, options=options, dropped=result.dropped)
            result.tiles += 1
            tile_index += 1
            if num_instances == 0:
                result.empty_tiles += 1
                if not options.keep_empty:
                    result.empty_tiles_skipped += 1
                    continue
            result.instances_written += num_instances
            result.samples.append(sample)
    return result


# Worker state: set once per process by the pool initializer (inherited as is under fork).
_WORKER_SPLIT: CocoSplit | None = None
_WORKER_OPTIONS: TileOptions | None = None


def _init_worker(split: CocoSplit, options: TileOptions) -> None:
    global _WORKER_SPLIT, _WORKER_OPTIONS
    _WORKER_SPLIT, _WORKER_OPTIONS = split, options


def _process_in_worker(image_id: int) -> ImageResult:
    assert _WORKER_SPLIT is not None and _WORKER_OPTIONS is not None
    return process_image(_WORKER_SPLIT, image_id, _WORKER_OPTIONS)


def write_index(tar_path: Path, index_path: Path) -> None:
    """DALI index of a WebDataset tar, written with DALI's wds2idx (shipped in the nvidia-dali wheel)."""
    try:
        from wds2idx import IndexCreator
    except ImportError as err:  # pragma: no cover - the wheel is a pinned dependency
        raise RuntimeError("DALI's wds2idx is not importable; install nvidia-dali") from err
    with IndexCreator(str(tar_path), str(index_path), verbose=False) as creator:
        creator.create_index()


class ShardWriter:
    """Writes samples into `PREFIX-000000.tar`, ... rolling over at `max_bytes`; each tar and its
    `.idx` are written under temporary names and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int):
        import webdataset  # imported here: only the writer process needs it

        self._webdataset = webdataset
        self.out_dir = out_dir
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._tar = None
        self._bytes = 0
        self._samples = 0

    def _names(self, number: int) -> tuple[Path, Path]:
        stem = f"{self.prefix}-{number:06d}"
        return self.out_dir / f"{stem}.tar", self.out_dir / f"{stem}.idx"

    def _temp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.partial")

    def write(self, sample: dict[str, Any]) -> None:
        size = sum(len(sample[name]) + 1024 for name in COMPONENTS)   # payload + header/padding
        if self._tar is not None and self._bytes + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            tar_path, _ = self._names(len(self.shards))
            self._file = open(self._temp(tar_path), "wb")
            self._tar = self._webdataset.TarWriter(self._file, encoder=False, mtime=0.0)
        self._tar.write(sample)
        self._bytes += size
        self._samples += 1

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tar_path, index_path = self._names(len(self.shards))
        temp_tar, temp_index = self._temp(tar_path), self._temp(index_path)
        write_index(temp_tar, temp_index)
        os.replace(temp_index, index_path)
        os.replace(temp_tar, tar_path)
        self.shards.append({"tar": tar_path.name, "idx": index_path.name, "samples": self._samples,
                            "bytes": tar_path.stat().st_size, "sha256": _sha256_file(tar_path)})
        self._tar = self._file = None
        self._bytes = self._samples = 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Remove the shard in progress (its final name never existed)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                tar_path, _ = self._names(len(self.shards))
                self._temp(tar_path).unlink(missing_ok=True)
            self._tar = self._file = None


def _remove_stale_outputs(out_dir: Path, prefix: str) -> None:
    """A new run first invalidates what an earlier run into the same folder left behind."""
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        try:
            old_prefix = json.loads(manifest_path.read_text(encoding="utf-8")).get("prefix")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            old_prefix = None
        if old_prefix is not None and old_prefix != prefix:
            raise ValueError(f"{out_dir} already holds shards with prefix {old_prefix!r}; "
                             f"write each split into its own folder")
        manifest_path.unlink()
    pattern = re.compile(rf"^\.?{re.escape(prefix)}-\d{{6}}\.(tar|idx)(\.partial)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) or path.name == ".manifest.json.partial":
            path.unlink()


class WorkerDied(RuntimeError):
    """A `--workers` process ended without returning its result."""


def _results(split: CocoSplit, options: TileOptions, workers: int) -> Iterator[ImageResult]:
    """Per-image results in image order, from `workers` processes (1: in this process)."""
    if workers <= 1:
        for image_id in split.image_ids:
            yield process_image(split, image_id, options)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    # (a process pool of concurrent.futures fails when a worker dies, e.g. killed for memory, where
    # multiprocessing.Pool would wait for its result forever)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(split, options))
    # at most `ahead` images submitted and not yet handed on: finished results wait here for the
    # writer in image order, so memory stays at a few images' tiles (pool.map would submit every
    # image at once and keep every result the writer has not reached)
    ahead = 2 * workers
    pending: collections.deque = collections.deque()
    image_ids = iter(split.image_ids)
    try:
        for image_id in itertools.islice(image_ids, ahead):
            pending.append(pool.submit(_process_in_worker, image_id))
        while pending:
            result = pending.popleft().result()
            for image_id in itertools.islice(image_ids, 1):
                pending.append(pool.submit(_process_in_worker, image_id))
            yield result
    except BrokenProcessPool as err:
        raise WorkerDied("a worker process died (killed, e.g. for lack of memory?) while it prepared an "
                         "image; no shard was completed from its output") from err
    finally:  # a run that fails (or stops reading) drops the images not started yet
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_shards(*, annotations: str | Path, images: str | Path, out_dir: str | Path, prefix: str = "train",
                   shard_size_mb: float = 64.0, options: TileOptions = TileOptions(), skip_bad: bool = False,
                   workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest (also written to out_dir/manifest.json)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
    if shard_size_mb <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size_mb} MB")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} exists and is not a folder")
    split = CocoSplit(annotations, images, skip_bad=skip_bad)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_outputs(out_dir, prefix)

    from tqdm import tqdm

    counts: dict[str, Any] = {
        "images": len(split), "images_written": 0, "tiles": 0, "samples": 0, "empty_tiles": 0,
        "empty_tiles_skipped": 0, "instances_in": 0, "instances": 0, "crowd_instances": 0,
        "empty_masks": 0, "dropped": {DROP_SMALL: 0, DROP_LAYERS: 0, DROP_COUNT: 0},
    }
    skipped: list[dict[str, Any]] = list(split.skipped)
    image_hashes: dict[str, str] = {}
    writer = ShardWriter(out_dir, prefix, max(1, int(shard_size_mb * 1024 * 1024)))
    try:
        bar = tqdm(total=len(split), desc=f"resam-prep {prefix}", unit="img", disable=not progress)
        for result in _results(split, options, workers):
            for sample in result.samples:
                writer.write(sample)
            counts["images_written"] += 1 if result.samples else 0
            counts["tiles"] += result.tiles
            counts["samples"] += len(result.samples)
            counts["empty_tiles"] += result.empty_tiles
            counts["empty_tiles_skipped"] += result.empty_tiles_skipped
            counts["instances_in"] += result.instances_in
            counts["instances"] += result.instances_written
            counts["crowd_instances"] += result.crowd
            counts["empty_masks"] += result.empty_masks
            for reason, number in result.dropped.items():
                counts["dropped"][reason] += number
            skipped.extend(result.skipped)
            if result.file_sha256:
                image_hashes[result.file_name] = result.file_sha256
            bar.update(1)
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    counts["skipped"] = {"image": sum(s["kind"] == "image" for s in skipped),
                         "annotation": sum(s["kind"] == "annotation" for s in skipped)}
    if counts["samples"] == 0:
        raise ValueError(f"{annotations}: no sample to write (all tiles empty or skipped)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "prefix": prefix,
        "components": list(COMPONENTS),
        "points_per_instance": {"positive": POINTS_PER_SIGN, "negative": POINTS_PER_SIGN},
        "tiling": {"tile_size": options.tile_size, "overlap": options.overlap, "min_area": options.min_area,
                   "keep_empty": options.keep_empty},
        "seed": options.seed,
        "shard_size_mb": shard_size_mb,
        "categories": split.categories,
        "counts": counts,
        "skipped": skipped,
        "shards": writer.shards,
        "sources": {"annotations": {"path": str(Path(annotations).resolve()),
                                    "sha256": _sha256_file(Path(annotations))},
                    "image_dir": str(Path(images).resolve()),
                    "images": image_hashes},
    }
    temp = out_dir / ".manifest.json.partial"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, out_dir / "manifest.json")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resam-prep",
        description="Cut a COCO split (JSON + image folder) into tiles and write WebDataset shards "
                    "with DALI index files and a manifest.")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    parser.add_argument("--out", required=True, help="output folder (one split per folder)")
    parser.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default train)")
    parser.add_argument("--shard-size-mb", type=float, default=64.0, help="roll over to a new shard at this size")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels (default 1024)")
    parser.add_argument("--overlap", type=int, default=128, help="overlap between neighbouring tiles (default 128)")
    parser.add_argument("--min-area", type=int, default=16, help="drop clipped instances below this many pixels")
    empty = parser.add_mutually_exclusive_group()
    empty.add_argument("--keep-empty", dest="keep_empty", action="store_true", default=True,
                       help="write tiles without instances (default)")
    empty.add_argument("--skip-empty", dest="keep_empty", action="store_false", help="leave out tiles without instances")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad images/annotations (recorded in the manifest) instead of failing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stored point prompts")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = TileOptions(tile_size=args.tile_size, overlap=args.overlap, min_area=args.min_area,
                              keep_empty=args.keep_empty, seed=args.seed)
        manifest = prepare_shards(annotations=args.annotations, images=args.images, out_dir=args.out,
                                  prefix=args.prefix, shard_size_mb=args.shard_size_mb, options=options,
                                  skip_bad=args.skip_bad, workers=args.workers, progress=not args.no_progress)
    except (ValueError, WorkerDied) as err:
        print(f"resam-prep: error: {err}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    print(f"resam-prep: {counts['samples']} samples ({counts['instances']} instances) from {counts['images']} images "
          f"in {len(manifest['shards'])} shard(s) under {args.out}; dropped {counts['dropped']}, "
          f"skipped {counts['skipped']}")
    return 0
