"""resam-prep end to end: tiling, sample format, determinism, bad input, atomic output."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from resam_dist.data.coco import CocoSplit, decode_rle
from resam_dist.data.shards import decode_sample, main, tile_origins
from resam_dist.data.synthetic import write_synthetic_coco
from resam_dist.resam.prompts import masks_to_boxes

TILE, OVERLAP, MIN_AREA = 96, 16, 60


def _prep(annotation_file: Path, out: Path, *extra: str) -> int:
    return main(["--annotations", str(annotation_file), "--images", str(annotation_file.parent / "images"),
                 "--out", str(out), "--no-progress", *extra])


def _read_samples(out: Path) -> list:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / shard["tar"]) for shard in manifest["shards"]]
    return [decode_sample(sample) for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def _tiling_args(*extra: str) -> list[str]:
    return ["--tile-size", str(TILE), "--overlap", str(OVERLAP), "--min-area", str(MIN_AREA), *extra]


@pytest.fixture(scope="module")
def buildings(tmp_path_factory):
    """Two 170 x 250 building scenes (image 1 polygons, image 2 RLE), prepared with 1 worker."""
    root = tmp_path_factory.mktemp("buildings")
    annotation_file = write_synthetic_coco(root / "coco", "buildings", 2, (170, 250), seed=1, segmentation="mixed")
    out = root / "shards"
    assert _prep(annotation_file, out, *_tiling_args("--shard-size-mb", "0.15", "--workers", "1")) == 0
    return annotation_file, out


def test_tile_origins():
    assert tile_origins(250, 96, 16) == [0, 80, 154]
    assert tile_origins(96, 96, 16) == [0]
    assert tile_origins(50, 96, 16) == [0]
    assert tile_origins(97, 96, 0) == [0, 1]
    assert tile_origins(300, 100, 0) == [0, 100, 200]


def test_samples_hold_clipped_instances_prompts_and_boxes(buildings):
    annotation_file, out = buildings
    manifest = json.loads((out / "manifest.json").read_text())
    split = CocoSplit(annotation_file, annotation_file.parent / "images")
    samples = _read_samples(out)
    assert len(samples) == 2 * 2 * 3   # 2 images x (2 x 3) tiles
    expected_fragments = dropped = 0
    for sample in samples:
        meta = sample.meta
        image_id, tile_index = meta["image_id"], meta["tile_index"]
        assert sample.key == f"{image_id}_{tile_index}"
        x0, y0 = meta["tile_origin"]
        assert meta["tile_size"] == [TILE, TILE]
        assert [x0, y0] == [[0, 80, 154][tile_index % 3], [0, 74][tile_index // 3]]
        source = split.load(image_id)
        np.testing.assert_array_equal(sample.image, source.image[y0:y0 + TILE, x0:x0 + TILE])
        # Instances clipped to the tile, small fragments dropped, order kept.
        clipped = source.masks[:, y0:y0 + TILE, x0:x0 + TILE]
        areas = clipped.sum(axis=(1, 2))
        keep = areas >= MIN_AREA
        dropped += int(((areas > 0) & ~keep).sum())
        expected_fragments += int(keep.sum())
        assert meta["instance_ids"] == source.instance_ids[keep].tolist()
        assert meta["category_ids"] == source.category_ids[keep].tolist()
        np.testing.assert_array_equal(sample.masks, clipped[keep])
        # labels.png == the RLE in meta.json, each instance on its recorded layer.
        for k, rle in enumerate(meta["rles"]):
            assert isinstance(rle["counts"], str) and rle["size"] == [TILE, TILE]
            np.testing.assert_array_equal(decode_rle(rle), sample.masks[k])
        labels = np.asarray(Image.open(_component(out, sample.key, "labels.png")))
        for k, layer in enumerate(meta["layers"]):
            assert (labels[..., layer][sample.masks[k]] == k + 1).all()
        # Prompts: 3 positives inside, 3 negatives outside, pixel centres.
        num = len(meta["instance_ids"])
        assert sample.prompts.shape == (num, 6, 3)
        for k in range(num):
            np.testing.assert_array_equal(sample.prompts[k, :, 2], [1, 1, 1, 0, 0, 0])
            cols = np.floor(sample.prompts[k, :, 0]).astype(int)
            rows = np.floor(sample.prompts[k, :, 1]).astype(int)
            np.testing.assert_array_equal(sample.prompts[k, :, :2] % 1, 0.5)
            assert sample.masks[k, rows[:3], cols[:3]].all()
            assert not sample.masks[k, rows[3:], cols[3:]].any()
        # Boxes: the tight boxes of the masks.
        np.testing.assert_array_equal(sample.boxes, masks_to_boxes(torch.from_numpy(sample.masks)).numpy())
        for k in range(num):
            bx0, by0, bx1, by1 = sample.boxes[k].astype(int)
            assert sample.masks[k].sum() == sample.masks[k, by0:by1, bx0:bx1].sum()
    counts = manifest["counts"]
    assert counts["samples"] == counts["tiles"] == len(samples)
    assert counts["instances"] == expected_fragments == sum(len(s.meta["instance_ids"]) for s in samples)
    assert counts["dropped"]["below_min_area"] == dropped > 0
    assert counts["images"] == counts["images_written"] == 2
    assert manifest["tiling"] == {"tile_size": TILE, "overlap": OVERLAP, "min_area": MIN_AREA, "keep_empty": True}
    assert manifest["categories"][0]["name"] == "building"


def _component(out: Path, key: str, name: str):
    """One component's bytes straight from the tars (checks the raw tar layout too)."""
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            try:
                member = tar.getmember(f"{key}.{name}")
            except KeyError:
                continue
            return io.BytesIO(tar.extractfile(member).read())
    raise AssertionError(f"{key}.{name} not found")


def test_manifest_shards_hashes_and_dali_indexes(buildings):
    annotation_file, out = buildings
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and len(manifest["shards"]) >= 2   # rolled over at 0.15 MB
    assert sum(shard["samples"] for shard in manifest["shards"]) == manifest["counts"]["samples"]
    for number, shard in enumerate(manifest["shards"]):
        assert shard["tar"] == f"train-{number:06d}.tar" and shard["idx"] == f"train-{number:06d}.idx"
        data = (out / shard["tar"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        index_lines = (out / shard["idx"]).read_text().splitlines()
        assert index_lines[0] == f"v1.2 {shard['samples']}"
        assert len(index_lines) == 1 + shard["samples"]
        assert all(line.split()[0::4] == ["boxes.f32", "image.png", "labels.png", "meta.json", "prompts.f32"]
                   for line in index_lines[1:])
        with tarfile.open(out / shard["tar"]) as tar:
            names = tar.getnames()
        assert all(name.count(".") == name.split(".", 1)[1].count(".") + 1 for name in names)   # key has no dot
    sources = manifest["sources"]
    assert sources["annotations"]["sha256"] == hashlib.sha256(annotation_file.read_bytes()).hexdigest()
    image_file = annotation_file.parent / "images" / "buildings_00000.png"
    assert sources["images"]["buildings_00000.png"] == hashlib.sha256(image_file.read_bytes()).hexdigest()
    assert not list(out.glob(".*partial"))


def test_output_is_identical_for_any_worker_count(buildings, tmp_path):
    annotation_file, out = buildings
    assert _prep(annotation_file, tmp_path, *_tiling_args("--shard-size-mb", "0.15", "--workers", "2")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_workers_run_a_bounded_window_ahead_of_the_writer(tmp_path, monkeypatch):
    """Workers take a new image only as the writer takes a result: at most 2 x workers images
    wait (pool.map submitted every image at once and kept every result the writer had not
    reached). The results come in image order, the same as one process's."""
    import resam_dist.data.shards as shards
    from resam_dist.data.shards import TileOptions, _results

    submitted: list[int] = []

    class CountingPool(shards.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(shards, "ProcessPoolExecutor", CountingPool)
    annotation_file = write_synthetic_coco(tmp_path / "coco", "sar_ships", 12, 64, seed=5)
    split = CocoSplit(annotation_file, annotation_file.parent / "images")
    options = TileOptions(tile_size=64, overlap=0)
    results = _results(split, options, 2)
    first = next(results)
    assert len(submitted) == 2 * 2 + 1  # the window, and one more for the result taken
    rest = list(results)
    assert submitted == list(split.image_ids)
    serial = list(_results(split, options, 1))
    assert [r.image_id for r in [first, *rest]] == [r.image_id for r in serial] == list(split.image_ids)


def test_grayscale_rle_images_smaller_than_a_tile(tmp_path):
    annotation_file = write_synthetic_coco(tmp_path / "coco", "sar_ships", 2, 80, seed=3, segmentation="rle")
    assert _prep(annotation_file, tmp_path / "out", "--tile-size", "128", "--overlap", "0", "--min-area", "1") == 0
    samples = _read_samples(tmp_path / "out")
    split = CocoSplit(annotation_file, annotation_file.parent / "images")
    assert len(samples) == 2
    for sample in samples:
        assert sample.meta["tile_origin"] == [0, 0] and sample.meta["tile_size"] == [80, 80]   # no upscaling
        assert sample.image.shape == (80, 80, 3)
        assert (sample.image[..., 0] == sample.image[..., 1]).all() and (sample.image[..., 1] == sample.image[..., 2]).all()
        source = split.load(sample.meta["image_id"])
        np.testing.assert_array_equal(sample.masks, source.masks)
        assert sample.meta["instance_ids"] == source.instance_ids.tolist()


def test_keep_and_skip_empty_tiles(tmp_path):
    annotation_file = write_synthetic_coco(tmp_path / "coco", "source_shapes", 1, 128, seed=4)
    assert _prep(annotation_file, tmp_path / "keep", "--tile-size", "32", "--overlap", "0") == 0
    assert _prep(annotation_file, tmp_path / "skip", "--tile-size", "32", "--overlap", "0", "--skip-empty") == 0
    keep = json.loads((tmp_path / "keep" / "manifest.json").read_text())["counts"]
    skip = json.loads((tmp_path / "skip" / "manifest.json").read_text())["counts"]
    assert keep["tiles"] == skip["tiles"] == 16 and keep["samples"] == 16
    assert keep["empty_tiles"] == skip["empty_tiles_skipped"] > 0
    assert skip["samples"] == 16 - skip["empty_tiles_skipped"]
    empty = [s for s in _read_samples(tmp_path / "keep") if not s.meta["instance_ids"]]
    assert len(empty) == keep["empty_tiles"]
    assert all(s.prompts.shape == (0, 6, 3) and s.boxes.shape == (0, 4) and not s.masks.any() for s in empty)
    assert all(s.meta["instance_ids"] for s in _read_samples(tmp_path / "skip"))
    # Tile indices stay those of the full grid when empty tiles are left out.
    assert {s.key for s in _read_samples(tmp_path / "skip")} <= {s.key for s in _read_samples(tmp_path / "keep")}


def _square(x, y, size):
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def _handmade(tmp_path: Path, annotations: list, size=(40, 40)) -> Path:
    (tmp_path / "images").mkdir(parents=True)
    Image.fromarray(np.full((size[0], size[1], 3), 90, dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 7, "file_name": "a.png", "width": size[1], "height": size[0]}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i + 1, "image_id": 7, "category_id": 1, "segmentation": seg, "iscrowd": 0}
                            for i, seg in enumerate(annotations)]}
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    return tmp_path / "annotations.json"


def test_overlapping_instances_get_separate_layers_and_extra_ones_are_dropped(tmp_path):
    # Five instances stacked on the same pixels (only 3 layers exist), one disjoint instance.
    annotation_file = _handmade(tmp_path, [_square(5, 5, 10)] * 5 + [_square(25, 25, 8)])
    assert _prep(annotation_file, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["dropped"]["needs_more_than_3_layers"] == 2
    (sample,) = _read_samples(tmp_path / "out")
    assert sample.meta["instance_ids"] == [1, 2, 3, 6]
    assert sample.meta["layers"] == [0, 1, 2, 0]
    for k in range(3):
        assert sample.masks[k].sum() == 100


def test_more_than_255_instances_in_a_tile_are_counted(tmp_path):
    squares = [_square(2 * (i % 20), 2 * (i // 20), 1) for i in range(300)]   # 1-pixel instances
    annotation_file = _handmade(tmp_path, squares)
    assert _prep(annotation_file, tmp_path / "out", "--min-area", "1") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["dropped"]["more_than_255_instances"] == 45
    (sample,) = _read_samples(tmp_path / "out")
    assert len(sample.meta["instance_ids"]) == 255 and sample.masks.sum() == 255
    assert sample.meta["instance_ids"] == list(range(1, 256))


def test_bad_input_names_file_and_id_or_is_skipped_and_recorded(tmp_path, capsys):
    annotation_file = _handmade(tmp_path, [_square(5, 5, 10), [[1, 1, 5, 5, 9]], _square(20, 20, 10)])
    assert _prep(annotation_file, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "annotations.json" in error and "annotation id 2" in error and "odd number" in error
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert _prep(annotation_file, tmp_path / "out", "--skip-bad") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"image": 0, "annotation": 1}
    (skip,) = manifest["skipped"]
    assert skip["id"] == 2 and skip["kind"] == "annotation" and "odd number" in skip["reason"]
    assert manifest["counts"]["instances"] == 2


def _assert_no_complete_looking_output(out: Path) -> None:
    """No manifest; every final-named tar is whole and has its index."""
    assert not (out / "manifest.json").exists()
    for tar_path in out.glob("train-*.tar"):
        index = tar_path.with_suffix(".idx")
        assert index.exists()
        expected = int(index.read_text().split("\n", 1)[0].split()[1])
        with tarfile.open(tar_path) as tar:
            keys = {name.split(".", 1)[0] for name in tar.getnames()}
        assert len(keys) == expected


def test_failure_mid_run_leaves_no_complete_looking_output(tmp_path, capsys):
    annotation_file = write_synthetic_coco(tmp_path / "coco", "source_shapes", 5, 64, seed=6)
    last = annotation_file.parent / "images" / "source_shapes_00004.png"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])   # readable header, truncated pixels
    out = tmp_path / "out"
    assert _prep(annotation_file, out, "--shard-size-mb", "0.001", "--workers", "2") == 1
    error = capsys.readouterr().err
    assert "source_shapes_00004.png" in error and "image id 5" in error
    # One shard per image: shards of images 1-3 are complete; image 4's shard was still open
    # when image 5 failed, so it was removed with the run.
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    _assert_no_complete_looking_output(out)
    assert not list(out.glob(".*partial"))
    # The same input with --skip-bad completes and records the image.
    assert _prep(annotation_file, out, "--shard-size-mb", "0.001", "--skip-bad") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["kind"], s["id"]) for s in manifest["skipped"]] == [("image", 5)]
    assert manifest["counts"]["samples"] == 4


def test_killed_run_leaves_no_complete_looking_output_and_rerun_cleans_up(tmp_path):
    annotation_file = write_synthetic_coco(tmp_path / "coco", "source_shapes", 30, 96, seed=7)
    out = tmp_path / "out"
    command = [sys.executable, "-c", "import sys; from resam_dist.data.shards import main; sys.exit(main(sys.argv[1:]))",
               "--annotations", str(annotation_file), "--images", str(annotation_file.parent / "images"),
               "--out", str(out), "--shard-size-mb", "0.001", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("train-*.tar")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert 1 <= len(list(out.glob("train-*.tar"))) < 30
    _assert_no_complete_looking_output(out)
    # A new run into the same folder replaces everything left behind.
    assert _prep(annotation_file, out, "--shard-size-mb", "64") == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.idx", "train-000000.tar"]


def test_invalid_options_are_reported(tmp_path, capsys):
    annotation_file = _handmade(tmp_path, [_square(5, 5, 10)])
    assert _prep(annotation_file, tmp_path / "out", "--tile-size", "64", "--overlap", "64") == 1
    assert "overlap" in capsys.readouterr().err
    assert _prep(annotation_file, tmp_path / "out", "--prefix", "a.b") == 1
    assert "prefix" in capsys.readouterr().err
    assert _prep(annotation_file, tmp_path / "out", "--prefix", "train") == 0
    assert _prep(annotation_file, tmp_path / "out", "--prefix", "test") == 1   # one split per folder
    assert "already holds shards with prefix 'train'" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").exists()
    # checked before the folder's earlier outputs are removed
    assert _prep(annotation_file, tmp_path / "out", "--seed", "-1") == 1
    assert "seed must be >= 0" in capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "a_file").write_text("")
    assert _prep(annotation_file, tmp_path / "a_file") == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_worker_that_dies_fails_the_run_instead_of_hanging(tmp_path, capsys, monkeypatch):
    """A --workers process killed (e.g. for memory) ends the run with an error; multiprocessing's
    Pool used to wait for its result forever. The workers are forked with the patched function."""
    import resam_dist.data.shards as shards
    annotation_file = _handmade(tmp_path, [_square(5, 5, 10)])
    monkeypatch.setattr(shards, "process_image", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    assert _prep(annotation_file, tmp_path / "out", "--workers", "2") == 1
    assert "a worker process died" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
