"""DALI training pipeline on real resam-prep shards (CPU pipeline, tiny tiles upsampled to 64 px)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resam_dist.config import Config
from resam_dist.data.pipeline import PIXEL_MEAN, PIXEL_STD, ShardError, build_train_loader
from resam_dist.data.shards import main as resam_prep
from resam_dist.data.synthetic import write_synthetic_coco
from resam_dist.resam.prompts import masks_to_boxes

CPU = torch.device("cpu")
IMAGE_SIZE = 64
NUM_SAMPLES = 18
# (kind, images, (h, w), first image id): cut into tiles of at most 48 px -> 40 x 48 shapes
# tiles, 48 x 48 one-channel SAR tiles (mostly empty) and 32 x 32 dense building tiles
SCENES = (("source_shapes", 4, (40, 56), 1), ("sar_ships", 2, (80, 80), 101), ("buildings", 2, (32, 32), 201))


# --------------------------------------------------------------------------------------------
# Shards written by resam-prep from synthetic COCO scenes
# --------------------------------------------------------------------------------------------

def write_coco(folder: Path, *, with_annotations: bool = True) -> Path:
    """The SCENES as one COCO split (images of all kinds in one folder); returns the JSON path."""
    parts = []
    for kind, count, size, first in SCENES:
        path = write_synthetic_coco(folder, kind, count, size, seed=first, first_image_id=first,
                                    first_annotation_id=first * 1000)
        parts.append(json.loads(path.read_text()))
    merged = {"images": [image for part in parts for image in part["images"]],
              "annotations": [a for part in parts for a in part["annotations"]] if with_annotations else [],
              "categories": parts[0]["categories"]}
    path = folder / "annotations.json"
    path.write_text(json.dumps(merged))
    return path


def run_resam_prep(coco: Path, out: Path) -> Path:
    code = resam_prep(["--annotations", str(coco), "--images", str(coco.parent / "images"), "--out", str(out),
                       "--tile-size", "48", "--overlap", "8", "--min-area", "6", "--shard-size-mb", "0.03",
                       "--no-progress"])
    assert code == 0
    return out


def read_stored(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every sample of the shards as stored: image and labels H x W x 3, prompts K x 6 x 3."""
    import tarfile

    files: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, component = member.name.split(".", 1)
                files.setdefault(key, {})[component] = tar.extractfile(member).read()
    return {key: {"image": np.array(Image.open(io.BytesIO(parts["image.png"]))),
                  "labels": np.array(Image.open(io.BytesIO(parts["labels.png"]))),
                  "prompts": np.frombuffer(parts["prompts.f32"], dtype="<f4").reshape(-1, 6, 3)}
            for key, parts in files.items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    return run_resam_prep(write_coco(root / "coco"), root / "shards")


@pytest.fixture(scope="module")
def stored(shards) -> dict[str, dict[str, np.ndarray]]:
    samples = read_stored(shards)
    assert len(samples) == NUM_SAMPLES
    return samples


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


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_shapes_dtypes_and_zero_padding_after_normalisation(shards, stored):
    loader = loader_for(make_config(str(shards), batch=4, num_points=2))
    assert len(loader) == 5   # 18 samples, batches of 4, the last one padded
    batches = list(loader)
    assert len(batches) == 5
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
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
            tile_h, tile_w = stored[key]["labels"].shape[:2]
            scale = size / max(tile_h, tile_w)
            h, w = batch.image_sizes[b].tolist()
            assert (h, w) == (int(tile_h * scale + 0.5), int(tile_w * scale + 0.5))
            count = int(batch.counts[b])
            assert count == len(stored[key]["prompts"])
            for view in (batch.weak[b], batch.strong[b]):   # zero padding after normalisation
                assert torch.all(view[:, h:, :] == 0) and torch.all(view[:, :, w:] == 0)
            assert not batch.gt_masks[b, :, h:, :].any() and not batch.gt_masks[b, :, :, w:].any()
            assert torch.all(batch.point_labels[b, count:] == -1) and not batch.gt_masks[b, count:].any()
            assert torch.equal(batch.point_labels[b, :count], torch.tensor([1, 1, 0, 0]).expand(count, 4))
            assert batch.gt_masks[b, :count].flatten(1).any(1).all()   # upsampling loses no instance
            pixels = batch.weak[b, :, :h, :w] * std + mean             # de-normalised: within [0, 255]
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


def test_geometry_masks_points_boxes_follow_the_flip(shards, stored):
    """Upsampling only (tiles <= 48 px to 64 px): nearest resize keeps every pixel-centre point in
    its instance, so the check is exact; boxes are the scaled stored boxes, which differ from the
    tight box of the nearest-resized mask by at most half an output pixel."""
    loader = loader_for(make_config(str(shards), batch=4, num_points=3))
    flips_seen = set()
    for _ in range(2):
        for batch in loader:
            for b, key in enumerate(batch.keys):
                h, w = batch.image_sizes[b].tolist()
                count = int(batch.counts[b])
                if count == 0:
                    continue
                labels, prompts = stored[key]["labels"], stored[key]["prompts"]
                masks = batch.gt_masks[b, :count, :h, :w]   # K x h x w
                matching = []
                for flip, (resized, exact) in _flip_variants(labels, h, w).items():
                    expected = torch.stack([(resized == k + 1).any(-1) for k in range(count)])
                    if torch.equal(masks[:, exact], expected[:, exact]):
                        matching.append(flip)
                assert matching, f"sample {key}: the masks match no flip of the stored labels"
                scaled = np.concatenate([prompts[:, :3, :2], prompts[:, 3:, :2]], 1)   # K x 6 x 2
                scaled = scaled * np.array([w / labels.shape[1], h / labels.shape[0]], dtype=np.float32)
                points_match = []
                for flip_x, flip_y in matching:   # the points moved with the masks
                    expected = torch.from_numpy(scaled.copy())
                    if flip_x:
                        expected[..., 0] = w - expected[..., 0]
                    if flip_y:
                        expected[..., 1] = h - expected[..., 1]
                    if torch.allclose(batch.points[b, :count], expected, atol=1e-4, rtol=0):
                        points_match.append((flip_x, flip_y))
                assert len(points_match) == 1, f"sample {key}: points match flips {points_match}"
                flips_seen.add(points_match[0])
                for k in range(count):
                    mask = batch.gt_masks[b, k]
                    for p in range(6):
                        x, y = batch.points[b, k, p].tolist()
                        assert bool(mask[int(y), int(x)]) == (p < 3), f"sample {key} instance {k} point {p}"
                    tight = masks_to_boxes(mask)
                    assert torch.all((tight - batch.boxes[b, k]).abs() <= 0.5 + 1e-4), (key, k)
    assert len(flips_seen) >= 3   # the flips are random, horizontal and vertical


def test_downsampled_tiles_keep_masks_and_points_inside_their_boxes(shards):
    """Shrinking 48 px tiles to 24 px, nearest resize may drop thin parts (or all) of an instance,
    but every pixel it keeps has its centre inside the scaled box, and so has every positive point."""
    loader = loader_for(make_config(str(shards), batch=4, num_points=3), image_size=24)
    kept = 0
    for batch in loader:
        for b in range(4):
            for k in range(int(batch.counts[b])):
                x0, y0, x1, y1 = batch.boxes[b, k].tolist()
                rows, cols = torch.nonzero(batch.gt_masks[b, k], as_tuple=True)
                centres_x, centres_y = cols + 0.5, rows + 0.5
                assert torch.all((centres_x >= x0 - 1e-4) & (centres_x <= x1 + 1e-4)), (batch.keys[b], k)
                assert torch.all((centres_y >= y0 - 1e-4) & (centres_y <= y1 + 1e-4)), (batch.keys[b], k)
                positives = batch.points[b, k, :3]   # 3 x 2
                assert torch.all((positives[:, 0] >= x0) & (positives[:, 0] <= x1)), (batch.keys[b], k)
                assert torch.all((positives[:, 1] >= y0) & (positives[:, 1] <= y1)), (batch.keys[b], k)
                kept += int(rows.numel() > 0)
    assert kept >= 50


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
    """The weak view's value at the same pixel explains more of the strong view than its value at
    the mirrored pixel (checked where the weak view is not itself nearly mirror-symmetric). The
    margin is small on smooth scenes, where spatial darkening dominates the strong view's variance."""
    loader = loader_for(make_config(str(shards), batch=4))
    compared = 0
    for _ in range(2):
        for batch in loader:
            for b in range(4):
                h, w = batch.image_sizes[b].tolist()
                weak, strong = batch.weak[b, :, :h, :w], batch.strong[b, :, :h, :w]
                assert not torch.equal(weak, strong)
                same = _explained_variance(strong, weak)
                for dims in ([-1], [-2], [-1, -2]):
                    if _explained_variance(weak, weak.flip(dims)) < 0.3:
                        mirrored = _explained_variance(strong, weak.flip(dims))
                        assert same > mirrored + 0.05, (batch.keys[b], dims, same, mirrored)
                        compared += 1
    assert compared >= 20, compared


def test_two_ranks_see_disjoint_samples_covering_the_dataset(shards, stored):
    cfg = make_config(str(shards), batch=4)
    for epoch in range(2):
        seen = []
        for rank in (0, 1):
            loader = loader_for(cfg, rank=rank, world=2, start_position=epoch * 12)
            assert len(loader) == 3   # 9 samples per rank -> 3 batches of 4
            keys = [key for batch in loader for key in batch.keys]
            assert len(keys) == 12
            seen.append(keys)
        unique = [set(keys) for keys in seen]
        assert not unique[0] & unique[1]
        assert unique[0] | unique[1] == set(stored)
        assert sum(len(keys) - len(set(keys)) for keys in seen) == 24 - NUM_SAMPLES   # padding duplicates


def test_same_seed_same_batches_and_other_seed_differs(shards):
    def two_epochs(**kwargs):
        loader = loader_for(make_config(str(shards)), **kwargs)
        return [(b.keys, batch_tensors(b)) for _ in range(2) for b in loader]

    first, second = two_epochs(), two_epochs()
    assert len(first) == len(second) == 10
    for (keys, tensors), (other_keys, other_tensors) in zip(first, second):
        assert keys == other_keys
        assert all(torch.equal(a, b) for a, b in zip(tensors, other_tensors))
    shifted = two_epochs(epoch_seed_offset=1)
    assert [keys for keys, _ in shifted] != [keys for keys, _ in first]
    assert not any(torch.equal(a[1][1], b[1][1]) for a, b in zip(shifted, first))   # strong views


def test_two_epochs_are_reshuffled_and_cover_everything(shards, stored):
    loader = loader_for(make_config(str(shards), batch=4))
    epochs = [[key for batch in loader for key in batch.keys] for _ in range(2)]
    assert loader.epoch == 2 and loader.position == 40
    for keys in epochs:
        assert set(keys) == set(stored)
    assert epochs[0] != epochs[1]


def test_resume_reproduces_the_uninterrupted_run(shards):
    cfg = make_config(str(shards), batch=4)
    loader = loader_for(cfg)
    reference = [(b.position, b.keys, batch_tensors(b)) for _ in range(2) for b in loader]   # 10 batches
    for start in (8, 20, 28):   # inside epoch 0, at the epoch boundary, inside epoch 1
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


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    """A private copy of the shards to damage."""
    import shutil

    return Path(shutil.copytree(shards, tmp_path / "shards"))


def test_truncated_tar_is_named(shard_copy):
    victim = shard_copy / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(ShardError, match="train-000001.tar"):
        loader_for(make_config(str(shard_copy)))                                     # manifest: size differs
    tars = [str(path) for path in sorted(shard_copy.glob("*.tar"))]
    with pytest.raises(ShardError, match="train-000001.tar is truncated"):
        loader_for(make_config(tars))                                                # tar list: index beyond file


def test_float_components_of_the_wrong_length_are_named(shard_copy):
    index = shard_copy / "train-000001.idx"
    lines = index.read_text().splitlines()
    parts = lines[1].split()
    at = parts.index("prompts.f32")
    rows = int(parts[at + 2]) // 72
    for length, pattern in ((16, "component prompts.f32 has 16 bytes, not a whole number of 72-byte instance rows"),
                            (72 * (rows + 1), f"holds {rows + 1} instances in prompts.f32 and {rows} in boxes.f32")):
        parts[at + 2] = str(length)
        index.write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n")
        with pytest.raises(ShardError, match=rf"train-000001.tar: sample 0 {pattern}"):
            loader_for(make_config([str(path) for path in sorted(shard_copy.glob("*.tar"))]))


def test_corrupt_tar_is_named(shard_copy):
    victim = shard_copy / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    index_line = (shard_copy / "train-000001.idx").read_text().splitlines()[2].split()   # its second sample
    offset = int(index_line[index_line.index("image.png") + 1])
    data[offset + 60:offset + 400] = bytes(340)                                     # inside the PNG data
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar.*sha256"):
        loader_for(make_config(str(shard_copy)), verify_checksums=True)
    loader = loader_for(make_config(str(shard_copy), batch=2, shuffle=False))       # sizes still match
    with pytest.raises(ShardError, match="train-000001.tar is corrupt"):
        list(loader)


def test_grayscale_origin_tiles_give_three_equal_channels(shards, stored):
    """SAR scenes are one-channel PNGs; resam-prep expands them to three equal channels."""
    loader = loader_for(make_config(str(shards), batch=4, shuffle=False))
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    checked = 0
    for batch in loader:
        for b, key in enumerate(batch.keys):
            if key.startswith("10"):   # image ids 101, 102: sar_ships
                image = stored[key]["image"]
                assert image.ndim == 3 and (image[..., 0] == image[..., 1]).all()
                h, w = batch.image_sizes[b].tolist()
                pixels = (batch.weak[b] * std + mean)[:, :h, :w]
                torch.testing.assert_close(pixels[0], pixels[1], atol=1e-3, rtol=0)
                torch.testing.assert_close(pixels[0], pixels[2], atol=1e-3, rtol=0)
                checked += 1
    assert checked >= 8


def test_all_empty_tiles(tmp_path):
    coco = write_coco(tmp_path / "coco", with_annotations=False)
    folder = run_resam_prep(coco, tmp_path / "shards")
    batches = list(loader_for(make_config(str(folder), batch=8)))
    assert len(batches) == 3
    for batch in batches:
        assert batch.points.shape == (8, 0, 4, 2) and batch.point_labels.shape == (8, 0, 4)
        assert batch.boxes.shape == (8, 0, 4) and batch.gt_masks.shape == (8, 0, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.counts.tolist() == [0] * 8


def test_shard_specs_folder_list_and_brace_pattern(shards, shard_copy):
    from resam_dist.data.pipeline import resolve_shards

    from_manifest = resolve_shards(shards)
    tars = sorted(shards.glob("*.tar"))
    assert [s.tar for s in from_manifest] == tars and sum(s.num_samples for s in from_manifest) == NUM_SAMPLES
    assert all(s.size_bytes == s.tar.stat().st_size and s.sha256 for s in from_manifest)
    assert [s.tar for s in resolve_shards([str(t) for t in tars])] == tars
    pattern = str(shards / f"train-{{000000..{len(tars) - 1:06d}}}.tar")
    assert [s.tar for s in resolve_shards(pattern)] == tars
    index = shard_copy / "train-000001.idx"
    original = index.read_text()
    lines = original.splitlines()
    parts = lines[1].split()
    parts[1] = "12x4"  # a garbled offset
    index.write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n")
    with pytest.raises(ShardError, match=r"train-000001.tar: index file .*train-000001.idx line 2: component "
                                         r".* has offset '12x4'"):
        resolve_shards(shard_copy)
    index.write_bytes(b"\xff\xfe garbage")  # not text at all
    with pytest.raises(ShardError, match=r"train-000001.tar: index file .*train-000001.idx is not a text index"):
        resolve_shards(shard_copy)
    assert lines[0].startswith("v1.2")  # v1.2 lines end in the component's file name, which may be UTF-8
    parts = lines[1].split()
    parts[3] = "b\u00e2timent_1.png"
    index.write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n", encoding="utf-8")
    resolve_shards(shard_copy)
    index.write_text(original)
    (shard_copy / "train-000002.idx").unlink()
    with pytest.raises(ShardError, match="train-000002.tar: index file .* not found"):
        resolve_shards(shard_copy)
    with pytest.raises(ValueError, match="no manifest.json"):
        resolve_shards(shard_copy.parent)


def test_bench_loader_smoke(tmp_path):
    """benchmarks/bench_loader.py end to end at toy sizes: both figures and the files."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--images", "2", "--scene-size", "96", "--tile-size", "64", "--batch", "2", "--epochs", "1",
                       "--steps", "1", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "loader_cpu.json").read_text())
    assert results["loader"]["images_per_s"] > 0 and results["training"]["images_per_s"] > 0
    assert results["ratio"] == pytest.approx(results["loader"]["images_per_s"] / results["training"]["images_per_s"])
    assert "resam_step" in results["training"]["what"]
    assert "Ratio loader / training" in (tmp_path / "loader_cpu.md").read_text()

    for flag in ("--steps", "--epochs", "--batch", "--threads"):  # refused before anything runs or is written
        with pytest.raises(SystemExit) as refused:
            bench.main([flag, "0", "--out", str(tmp_path / "refused")])
        assert refused.value.code == 2
    assert not (tmp_path / "refused").exists()
