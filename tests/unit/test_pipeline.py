"""DALI training pipeline on real WebDataset tars (CPU pipeline, tiny tiles)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resam_dist.config import Config
from resam_dist.data.pipeline import PIXEL_MEAN, PIXEL_STD, ShardError, build_train_loader
from resam_dist.resam.prompts import masks_to_boxes, sample_points

CPU = torch.device("cpu")
TILE_SIZES = ((40, 56), (64, 48), (32, 32), (48, 48))   # (h, w), all upsampled to IMAGE_SIZE
IMAGE_SIZE = 64
MAX_INSTANCES = 4


# --------------------------------------------------------------------------------------------
# Shards in the resam-prep sample format, written with webdataset's TarWriter and DALI's wds2idx
# --------------------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tile(rng: np.random.Generator, height: int, width: int, num_instances: int, grayscale: bool):
    """(image H x W x 3 or H x W uint8, labels H x W x 3 uint8, masks K x H x W bool)."""
    blocks = rng.integers(0, 256, (height // 2 + 1, width // 2 + 1, 3), dtype=np.uint8)
    image = np.kron(blocks, np.ones((2, 2, 1), dtype=np.uint8))[:height, :width]   # 2 x 2 block noise
    if grayscale:
        image = np.ascontiguousarray(image[..., 0])
    labels = np.zeros((height, width, 3), dtype=np.uint8)
    masks = np.zeros((num_instances, height, width), dtype=bool)
    rows, cols = np.mgrid[:height, :width]
    for k in range(num_instances):
        while True:   # ellipses; overlapping ones go to different layers
            cy, cx = rng.integers(0, height), rng.integers(0, width)
            ry, rx = rng.integers(3, height // 3), rng.integers(3, width // 3)
            mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
            layer = next((c for c in range(3) if not labels[..., c][mask].any()), None)
            if mask.sum() >= 6 and layer is not None:
                break
        masks[k] = mask
        labels[..., layer][mask] = k + 1
    return image, labels, masks


def write_test_shards(folder: Path, *, samples_per_shard=(5, 6), seed: int = 0, empty_only: bool = False) -> Path:
    """Shards + manifest in the resam-prep format. Sample n has key f"{n}_0", n % 5 instances
    (0 when `empty_only`), tile size TILE_SIZES[n % 4]; every fourth image is a grayscale PNG."""
    from wds2idx import IndexCreator
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, number = [], 0
    for shard_number, count in enumerate(samples_per_shard):
        tar = folder / f"train-{shard_number:06d}.tar"
        index = tar.with_suffix(".idx")
        with webdataset.TarWriter(str(tar), encoder=False) as writer:
            for _ in range(count):
                height, width = TILE_SIZES[number % len(TILE_SIZES)]
                num_instances = 0 if empty_only else number % (MAX_INSTANCES + 1)
                image, labels, masks = _tile(rng, height, width, num_instances, grayscale=number % 4 == 3)
                prompts = np.zeros((num_instances, 6, 3), dtype=np.float32)   # K x 6 x 3
                for k in range(num_instances):
                    positives, negatives = sample_points(masks[k], 3, rng)
                    prompts[k, :3, :2], prompts[k, :3, 2], prompts[k, 3:, :2] = positives, 1.0, negatives
                boxes = masks_to_boxes(torch.from_numpy(masks)).numpy()       # K x 4
                writer.write({"__key__": f"{number}_0", "image.png": _png(image), "labels.png": _png(labels),
                              "prompts.f32": prompts.astype("<f4").tobytes(),
                              "boxes.f32": boxes.astype("<f4").tobytes(),
                              "meta.json": json.dumps({"image_id": number, "tile_index": 0}).encode()})
                number += 1
        with IndexCreator(str(tar), str(index), verbose=False) as creator:
            creator.create_index()
        entries.append({"tar": tar.name, "idx": index.name, "samples": count, "bytes": tar.stat().st_size,
                        "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": entries}))
    return folder


def read_sample(folder: Path, key: str) -> dict[str, np.ndarray]:
    """The stored components of one sample (for reference computations)."""
    import webdataset

    for tar in sorted(folder.glob("*.tar")):
        for sample in webdataset.WebDataset(str(tar), shardshuffle=False):
            if sample["__key__"] == key:
                labels = np.array(Image.open(io.BytesIO(sample["labels.png"])))
                prompts = np.frombuffer(sample["prompts.f32"], dtype="<f4").reshape(-1, 6, 3)
                return {"labels": labels, "prompts": prompts}
    raise KeyError(key)


def make_config(shards: str | list[str], *, batch: int = 4, num_points: int = 2, seed: int = 0,
                shuffle: bool = True) -> Config:
    cfg = Config()
    cfg.data.train_shards = shards if isinstance(shards, str) else shards
    cfg.data.num_points = num_points
    cfg.data.seed = seed
    cfg.data.shuffle = shuffle
    cfg.data.reader_threads = 2
    cfg.train.images_per_rank = batch
    return cfg


def loader_for(cfg: Config, *, rank: int = 0, world: int = 1, start_position: int = 0, image_size: int = IMAGE_SIZE,
               **kwargs):
    return build_train_loader(cfg, image_size=image_size, rank=rank, world_size=world, local_rank=0, device=CPU,
                              start_position=start_position, **kwargs)


def batch_tensors(batch) -> list[torch.Tensor]:
    return [batch.weak, batch.strong, batch.gt_masks, batch.points, batch.point_labels, batch.boxes, batch.counts,
            batch.image_sizes]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_test_shards(tmp_path_factory.mktemp("shards"))   # 11 samples in 2 tars


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_shapes_dtypes_and_zero_padding_after_normalisation(shards):
    loader = loader_for(make_config(str(shards), batch=4, num_points=2))
    assert len(loader) == 3   # 11 samples, batches of 4, last one padded
    batches = list(loader)
    assert len(batches) == 3
    for number, batch in enumerate(batches):
        size = IMAGE_SIZE
        num_instances = batch.points.shape[1]
        assert batch.weak.shape == batch.strong.shape == (4, 3, size, size)
        assert batch.weak.dtype == batch.strong.dtype == torch.float32
        assert batch.gt_masks.shape == (4, num_instances, size, size) and batch.gt_masks.dtype == torch.bool
        assert batch.points.shape == (4, num_instances, 4, 2) and batch.points.dtype == torch.float32
        assert batch.point_labels.shape == (4, num_instances, 4) and batch.point_labels.dtype == torch.int64
        assert batch.boxes.shape == (4, num_instances, 4) and batch.boxes.dtype == torch.float32
        assert batch.counts.dtype == torch.int64 and batch.image_sizes.dtype == torch.int64
        assert num_instances == int(batch.counts.max())
        assert len(batch.keys) == 4 and batch.position == 4 * (number + 1)
        for b, key in enumerate(batch.keys):
            tile_h, tile_w = TILE_SIZES[int(key.split("_")[0]) % len(TILE_SIZES)]
            scale = size / max(tile_h, tile_w)
            h, w = batch.image_sizes[b].tolist()
            assert (h, w) == (int(tile_h * scale + 0.5), int(tile_w * scale + 0.5))
            assert int(batch.counts[b]) == int(key.split("_")[0]) % (MAX_INSTANCES + 1)
            for view in (batch.weak[b], batch.strong[b]):   # zero padding after normalisation
                assert torch.all(view[:, h:, :] == 0) and torch.all(view[:, :, w:] == 0)
            assert not batch.gt_masks[b, :, h:, :].any() and not batch.gt_masks[b, :, :, w:].any()
            count = int(batch.counts[b])
            assert torch.all(batch.point_labels[b, count:] == -1) and not batch.gt_masks[b, count:].any()
            assert torch.equal(batch.point_labels[b, :count], torch.tensor([1, 1, 0, 0]).expand(count, 4))
        # de-normalised weak view lies in [0, 255] on the valid area
        mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
        pixels = batch.weak[0, :, :batch.image_sizes[0, 0], :batch.image_sizes[0, 1]] * std + mean
        assert pixels.min() >= -0.01 and pixels.max() <= 255.01


def _nearest_source(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-aligned nearest-neighbour source index per output pixel, and which output pixels
    sit on an exact tie (source coordinate a whole number, where float rounding may go either way)."""
    coordinate = (np.arange(out_size) + 0.5) * in_size / out_size
    return np.minimum(coordinate.astype(int), in_size - 1), np.abs(coordinate - np.round(coordinate)) < 1e-6


def _flip_variants(labels: np.ndarray, height: int, width: int):
    """The stored label image resized (nearest) to h x w under the four flips, with the mask of
    output pixels that are not on a resize tie (compared exactly)."""
    rows, row_ties = _nearest_source(height, labels.shape[0])
    cols, col_ties = _nearest_source(width, labels.shape[1])
    resized = torch.from_numpy(labels[rows][:, cols])                               # h x w x 3
    exact = torch.from_numpy(~row_ties[:, None] & ~col_ties[None, :])               # h x w
    variants = {}
    for flip_x in (False, True):
        for flip_y in (False, True):
            dims = [d for d, flip in ((1, flip_x), (0, flip_y)) if flip]
            variants[(flip_x, flip_y)] = (resized.flip(dims), exact.flip(dims))
    return variants


def test_geometry_masks_points_boxes_follow_the_flip(shards):
    """Upsampling only (tiles <= 64 px to 64 px): nearest resize keeps every pixel-centre point in
    its instance, so the check is exact; boxes are the scaled stored boxes, which differ from the
    tight box of the nearest-resized mask by at most half an output pixel."""
    loader = loader_for(make_config(str(shards), batch=4, num_points=3))
    flips_seen = set()
    for _ in range(2):
        for batch in loader:
            for b, key in enumerate(batch.keys):
                h, w = batch.image_sizes[b].tolist()
                count = int(batch.counts[b])
                stored = read_sample(shards, key)
                variants = _flip_variants(stored["labels"], h, w)
                masks = batch.gt_masks[b, :count, :h, :w]   # K x h x w
                matching = []
                for flip, (resized, exact) in variants.items():
                    expected = torch.stack([(resized == k + 1).any(-1) for k in range(count)]) if count else masks
                    if torch.equal(masks[:, exact], expected[:, exact]):
                        matching.append(flip)
                assert matching, f"sample {key}: masks match no flip of the stored labels"
                if count:
                    assert len(matching) == 1
                    flip_x, flip_y = matching[0]
                    flips_seen.add((flip_x, flip_y))
                    scale_x, scale_y = w / stored["labels"].shape[1], h / stored["labels"].shape[0]
                    expected = np.concatenate([stored["prompts"][:, :3, :2], stored["prompts"][:, 3:, :2]], 1)
                    expected = expected * np.array([scale_x, scale_y], dtype=np.float32)
                    if flip_x:
                        expected[..., 0] = w - expected[..., 0]
                    if flip_y:
                        expected[..., 1] = h - expected[..., 1]
                    torch.testing.assert_close(batch.points[b, :count], torch.from_numpy(expected), atol=1e-4, rtol=0)
                for k in range(count):
                    mask = batch.gt_masks[b, k]
                    for p in range(6):
                        x, y = batch.points[b, k, p].tolist()
                        inside = bool(mask[int(y), int(x)])
                        assert inside == (p < 3), f"sample {key} instance {k} point {p} at {(x, y)}"
                    tight = masks_to_boxes(mask)
                    assert torch.all((tight - batch.boxes[b, k]).abs() <= 0.5 + 1e-4), (key, k)
                    box = batch.boxes[b, k]
                    assert box[0] < box[2] and box[1] < box[3]
    assert len(flips_seen) >= 3   # the flips are random, horizontal and vertical


def test_downsampled_tiles_keep_points_near_their_instance(shards):
    """Shrinking 56 px tiles to 24 px: nearest resize may move a thin boundary by one output pixel."""
    loader = loader_for(make_config(str(shards), batch=4, num_points=1), image_size=24)
    for batch in loader:
        for b in range(4):
            for k in range(int(batch.counts[b])):
                mask = batch.gt_masks[b, k]
                x, y = batch.points[b, k, 0].tolist()   # positive point
                row, col = int(y), int(x)
                assert mask[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2].any(), (batch.keys[b], k)
                rows, cols = torch.nonzero(mask, as_tuple=True)
                if rows.numel():
                    box = batch.boxes[b, k]
                    assert box[0] - 1 <= cols.min() and cols.max() + 1 <= box[2] + 1
                    assert box[1] - 1 <= rows.min() and rows.max() + 1 <= box[3] + 1


def _explained_variance(strong: torch.Tensor, weak: torch.Tensor, bins: int = 32) -> float:
    """Share of the strong view's variance explained by the weak view's value at the same pixel
    (binned), averaged over channels: ~1 when strong is a pointwise function of weak."""
    shares = []
    for channel in range(strong.shape[0]):
        s, w = strong[channel].flatten(), weak[channel].flatten()
        index = ((w - w.min()) / (w.max() - w.min() + 1e-9) * (bins - 1)).round().long()
        sums = torch.zeros(bins).index_add_(0, index, s)
        counts = torch.zeros(bins).index_add_(0, index, torch.ones_like(s))
        residual = s - (sums / counts.clamp(min=1))[index]
        shares.append(1 - float(residual.pow(2).mean() / (s.var(unbiased=False) + 1e-9)))
    return sum(shares) / len(shares)


def test_strong_view_shares_geometry_and_differs_photometrically(shards):
    loader = loader_for(make_config(str(shards), batch=4))
    for _ in range(2):
        for batch in loader:
            for b in range(4):
                h, w = batch.image_sizes[b].tolist()
                weak, strong = batch.weak[b, :, :h, :w], batch.strong[b, :, :h, :w]
                assert not torch.equal(weak, strong)
                same = _explained_variance(strong, weak)
                mirrored = max(_explained_variance(strong, weak.flip(dims)) for dims in ([-1], [-2], [-1, -2]))
                assert same > 0.4 and same > mirrored + 0.3, (batch.keys[b], same, mirrored)


def test_two_ranks_see_disjoint_samples_covering_the_dataset(shards):
    cfg = make_config(str(shards), batch=4)
    all_keys = {f"{n}_0" for n in range(11)}
    for epoch in range(2):
        seen = []
        for rank in (0, 1):
            loader = loader_for(cfg, rank=rank, world=2, start_position=epoch * 8)
            assert len(loader) == 2   # shards of 5 and 6 samples -> 2 batches of 4 on both ranks
            keys = [key for batch in loader for key in batch.keys]
            assert len(keys) == 8
            seen.append(keys)
        unique = [set(keys) for keys in seen]
        assert not unique[0] & unique[1]
        assert unique[0] | unique[1] == all_keys
        duplicates = sum(len(keys) - len(set(keys)) for keys in seen)
        assert duplicates == 16 - 11   # padding repeats a sample of the shorter shard


def test_same_seed_same_batches_and_other_seed_differs(shards):
    def two_epochs(**kwargs):
        loader = loader_for(make_config(str(shards)), **kwargs)
        return [(b.keys, batch_tensors(b)) for _ in range(2) for b in loader]

    first, second = two_epochs(), two_epochs()
    assert len(first) == len(second) == 6
    for (keys, tensors), (other_keys, other_tensors) in zip(first, second):
        assert keys == other_keys
        assert all(torch.equal(a, b) for a, b in zip(tensors, other_tensors))
    shifted = two_epochs(epoch_seed_offset=1)
    assert [keys for keys, _ in shifted] != [keys for keys, _ in first]
    assert not any(torch.equal(a[1][1], b[1][1]) for a, b in zip(shifted, first))   # strong views


def test_two_epochs_are_reshuffled_and_cover_everything(shards):
    loader = loader_for(make_config(str(shards), batch=4))
    epochs = [[key for batch in loader for key in batch.keys] for _ in range(2)]
    assert loader.epoch == 2 and loader.position == 24
    for keys in epochs:
        assert set(keys) == {f"{n}_0" for n in range(11)}
    assert epochs[0] != epochs[1]


def test_resume_reproduces_the_uninterrupted_run(shards):
    cfg = make_config(str(shards), batch=4)
    loader = loader_for(cfg)
    reference = [(b.position, b.keys, batch_tensors(b)) for _ in range(2) for b in loader]   # 6 batches
    for start in (4, 12, 20):
        resumed = loader_for(cfg, start_position=start)
        continued = [(b.position, b.keys, batch_tensors(b)) for _ in range(2) for b in resumed]
        expected = [item for item in reference if item[0] > start]
        continued = continued[:len(expected)]
        assert [c[0] for c in continued] == [e[0] for e in expected]
        for (_, keys, tensors), (_, ref_keys, ref_tensors) in zip(continued, expected):
            assert keys == ref_keys
            assert all(torch.equal(a, b) for a, b in zip(tensors, ref_tensors))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        loader_for(cfg, start_position=3)


def test_truncated_tar_is_named(tmp_path):
    folder = write_test_shards(tmp_path / "shards", samples_per_shard=(3, 3))
    victim = folder / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:2000])
    with pytest.raises(ShardError, match="train-000001.tar"):
        loader_for(make_config(str(folder)))                                  # manifest: size differs
    with pytest.raises(ShardError, match="train-000001.tar.*truncated"):
        loader_for(make_config([str(folder / "train-000000.tar"), str(victim)]))   # tar list: index beyond file


def test_corrupt_tar_is_named(tmp_path):
    folder = write_test_shards(tmp_path / "shards", samples_per_shard=(3, 3))
    victim = folder / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    index_line = (folder / "train-000001.idx").read_text().splitlines()[2].split()   # second sample
    offset = int(index_line[index_line.index("image.png") + 1])
    data[offset + 60:offset + 400] = bytes(340)                                     # inside the PNG data
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar.*sha256"):
        loader_for(make_config(str(folder)), verify_checksums=True)
    loader = loader_for(make_config(str(folder), batch=2, shuffle=False))
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(loader)


def test_grayscale_tiles_decode_to_three_equal_channels(shards):
    loader = loader_for(make_config(str(shards), batch=4, shuffle=False))
    checked = 0
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    for batch in loader:
        for b, key in enumerate(batch.keys):
            if int(key.split("_")[0]) % 4 == 3:   # written as a one-channel PNG
                h, w = batch.image_sizes[b].tolist()
                pixels = (batch.weak[b] * std + mean)[:, :h, :w]
                torch.testing.assert_close(pixels[0], pixels[1], atol=1e-3, rtol=0)
                torch.testing.assert_close(pixels[0], pixels[2], atol=1e-3, rtol=0)
                checked += 1
    assert checked >= 2


def test_empty_tiles(tmp_path):
    folder = write_test_shards(tmp_path / "empty", samples_per_shard=(3,), empty_only=True)
    batches = list(loader_for(make_config(str(folder), batch=2)))
    assert len(batches) == 2
    for batch in batches:
        assert batch.points.shape == (2, 0, 4, 2) and batch.point_labels.shape == (2, 0, 4)
        assert batch.boxes.shape == (2, 0, 4) and batch.gt_masks.shape == (2, 0, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.counts.tolist() == [0, 0]
