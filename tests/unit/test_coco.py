"""COCO reader: every segmentation format and image kind, exact masks, clear errors or counted skips."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from resam_dist.data.coco import CocoSplit, decode_instance, encode_rle, read_image_rgb

H, W = 40, 56


def _rgb(seed, height=H, width=W):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _square(x, y, size):
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def _uncompressed(mask):
    flat = mask.T.reshape(-1).astype(np.int8)
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(boundaries).tolist()
    return [0] + counts if flat[0] else counts


def _write_split(tmp_path: Path, *, images=None, annotations=None, categories=None, extra=None) -> Path:
    """A small split: an RGB PNG (polygon + crowd), a grayscale PNG (RLE strings), a JPEG and a
    16-bit TIFF (uncompressed RLE). Overrides replace whole lists."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    Image.fromarray(_rgb(0)).save(image_dir / "rgb.png")
    gray = np.random.default_rng(1).integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(image_dir / "gray.png")
    Image.fromarray(_rgb(2)).save(image_dir / "photo.jpg", quality=95)
    sixteen = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 7)
    Image.fromarray(sixteen).save(image_dir / "sar.tif")
    disk = np.hypot(*np.meshgrid(np.arange(W) - 30, np.arange(H) - 20)) < 9
    default_images = [
        {"id": 1, "file_name": "rgb.png", "width": W, "height": H},
        {"id": 2, "file_name": "gray.png", "width": W, "height": H},
        {"id": 3, "file_name": "photo.jpg", "width": W, "height": H},
        {"id": 4, "file_name": "sar.tif", "width": W, "height": H},
    ]
    default_annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[2.3, 3.1, 20.7, 4.2, 11.5, 25.9]], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "segmentation": _square(30, 10, 12), "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": _uncompressed(disk)}},
        {"id": 20, "image_id": 2, "category_id": 2, "segmentation": encode_rle(disk), "iscrowd": 0},
        {"id": 30, "image_id": 3, "category_id": 1, "segmentation": _square(5, 5, 8)},
        {"id": 40, "image_id": 4, "category_id": 1, "segmentation": {"size": [H, W], "counts": _uncompressed(disk)}},
    ]
    data = {
        "images": default_images if images is None else images,
        "annotations": default_annotations if annotations is None else annotations,
        "categories": [{"id": 1, "name": "plane"}, {"id": 2, "name": "ship"}] if categories is None else categories,
    }
    data.update(extra or {})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_loads_every_format_exactly_like_pycocotools(tmp_path):
    annotation_file = _write_split(tmp_path)
    split = CocoSplit(annotation_file, tmp_path / "images")
    reference = COCO(str(annotation_file))
    assert len(split) == 4 and split.image_ids == [1, 2, 3, 4]
    for image_id in split.image_ids:
        item = split.load(image_id)
        assert item.image.shape == (H, W, 3) and item.image.dtype == np.uint8
        anns = [a for a in reference.loadAnns(reference.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        assert item.instance_ids.tolist() == [a["id"] for a in anns]
        assert item.category_ids.tolist() == [a["category_id"] for a in anns]
        assert item.masks.shape == (len(anns), H, W) and item.masks.dtype == bool
        for mask, ann in zip(item.masks, anns):
            np.testing.assert_array_equal(mask, reference.annToMask(ann).astype(bool))
    first = split.load(1)
    assert first.num_crowd == 1 and first.file_name == "rgb.png"
    np.testing.assert_array_equal(first.image, _rgb(0))
    gray = split.load(2).image
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    sar = split.load(4).image   # 16-bit stretched onto 0..255
    assert sar.min() == 0 and sar.max() == 255 and (sar[..., 0] == sar[..., 2]).all()
    with_crowd = CocoSplit(annotation_file, tmp_path / "images", include_crowd=True).load(1)
    assert with_crowd.instance_ids.tolist() == [10, 11, 12] and with_crowd.num_crowd == 0


def test_crop_decoding_matches_full_decoding_near_borders():
    rng = np.random.default_rng(0)
    height, width = 37, 61
    for _ in range(60):
        # Random polygons with fractional vertices, some partly outside the image.
        cx, cy = rng.uniform(-5, width + 5), rng.uniform(-5, height + 5)
        points = np.stack([cx + rng.uniform(-15, 15, 7), cy + rng.uniform(-15, 15, 7)], axis=1)
        polygon = np.round(points, 2).reshape(-1).tolist()
        full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)
        crop = decode_instance({"id": 1, "category_id": 1, "segmentation": [polygon]}, height, width)
        if not full.any():
            assert crop is None
            continue
        rebuilt = np.zeros_like(full)
        rebuilt[crop.y0:crop.y0 + crop.mask.shape[0], crop.x0:crop.x0 + crop.mask.shape[1]] = crop.mask
        np.testing.assert_array_equal(rebuilt, full)
        assert crop.mask[0].any() and crop.mask[-1].any() and crop.mask[:, 0].any() and crop.mask[:, -1].any()


def test_exif_orientation_is_ignored(tmp_path):
    rows, cols = np.meshgrid(np.arange(20), np.arange(30), indexing="ij")
    pixels = np.stack([rows * 12, cols * 8, np.full_like(rows, 128)], axis=-1).astype(np.uint8)   # smooth
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 degrees" for viewers
    Image.fromarray(pixels).save(tmp_path / "x.jpg", exif=exif, quality=100)
    decoded = read_image_rgb(tmp_path / "x.jpg")
    assert decoded.shape == (20, 30, 3)
    assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 12


def _with(tmp_path, edit):
    """The default split with one edit applied to its JSON data."""
    path = _write_split(tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


BAD_CASES = {
    "polygon with 2 points": (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]]), "annotation id 10", "fewer than 3 points"),
    "polygon far outside the image": (lambda d: d["annotations"][0].update(segmentation=[[2, 2, 1e9, 2, 20, 20]]),
                                      "annotation id 10", "far outside"),
    "polygon beyond float range": (lambda d: d["annotations"][0].update(segmentation=[[2, 2, 10 ** 400, 2, 20, 20]]),
                                   "annotation id 10", "non-finite"),
    "odd coordinates": (lambda d: d["annotations"][1].update(segmentation=[[1, 1, 5, 5, 9]]), "annotation id 11", "odd number"),
    "unknown category": (lambda d: d["annotations"][3].update(category_id=99), "annotation id 20", "unknown or non-integer category id 99"),
    "list as category": (lambda d: d["annotations"][3].update(category_id=[1]), "annotation id 20", "non-integer category id [1]"),
    "null iscrowd": (lambda d: d["annotations"][3].update(iscrowd=None), "annotation id 20", "'iscrowd' must be 0 or 1, got None"),
    "string iscrowd": (lambda d: d["annotations"][3].update(iscrowd="0"), "annotation id 20", "'iscrowd' must be 0 or 1, got '0'"),
    "duplicate annotation id": (lambda d: d["annotations"][4].update(id=10), "annotation id 10", "duplicate annotation id"),
    "missing segmentation": (lambda d: d["annotations"][5].pop("segmentation"), "annotation id 40", "missing key"),
    "unknown image": (lambda d: d["annotations"][5].update(image_id=77), "annotation id 40", "unknown image id 77"),
    "RLE size": (lambda d: d["annotations"][3]["segmentation"].update(size=[H + 1, W]), "annotation id 20", "differs from image size"),
    "garbage RLE string": (lambda d: d["annotations"][3]["segmentation"].update(counts="a~~~"), "annotation id 20", "RLE"),
    "missing width": (lambda d: d["images"][2].pop("width"), "image id 3", "missing key"),
    "duplicate image id": (lambda d: (d["images"][3].update(id=2), d["annotations"][5].update(image_id=2)),
                           "image id 2", "duplicate image id"),
    "size mismatch": (lambda d: d["images"][2].update(width=W + 3), "image id 3", "JSON says"),
    "missing image file": (lambda d: d["images"][1].update(file_name="nope.png"), "image id 2", "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_naming_file_and_id(tmp_path, case):
    edit, where, reason = BAD_CASES[case]
    path = _with(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        CocoSplit(path, tmp_path / "images")
    message = str(info.value)
    assert where in message and reason in message
    assert "annotations.json" in message or "images" in message


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_bad_records_the_skip_and_keeps_the_rest(tmp_path, case):
    edit, where, reason = BAD_CASES[case]
    path = _with(tmp_path, edit)
    split = CocoSplit(path, tmp_path / "images", skip_bad=True)
    assert len(split.skipped) == 1
    skip = split.skipped[0]
    assert f"{skip['kind']} id {skip['id']}" == where and reason in skip["reason"]
    loaded = [split.load(image_id) for image_id in split.image_ids]
    assert all(item is not None for item in loaded)
    kept = sum(len(item.instance_ids) for item in loaded)
    if skip["kind"] == "annotation":
        assert kept == 4   # 5 non-crowd instances, one skipped
    elif case == "duplicate image id":   # both images with id 2 are skipped, with their annotations
        assert sorted(split.image_ids) == [1, 3]
    else:
        assert len(split) == 3


def test_malformed_json_and_missing_top_level_keys(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        CocoSplit(tmp_path / "broken.json", tmp_path)
    (tmp_path / "partial.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match=r"partial\.json: missing top-level key 'categories'"):
        CocoSplit(tmp_path / "partial.json", tmp_path)
    with pytest.raises(ValueError, match="not found"):
        CocoSplit(tmp_path / "absent.json", tmp_path)


def test_unreadable_image_data_fails_at_load_or_is_skipped(tmp_path):
    path = _write_split(tmp_path)
    png = (tmp_path / "images" / "rgb.png").read_bytes()
    (tmp_path / "images" / "rgb.png").write_bytes(png[: len(png) // 2])   # header intact, data cut
    split = CocoSplit(path, tmp_path / "images")
    with pytest.raises(ValueError, match=r"rgb\.png.*image id 1"):
        split.load(1)
    (tmp_path / "images" / "gray.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"gray\.png.*image id 2.*unreadable"):
        CocoSplit(path, tmp_path / "images")
    tolerant = CocoSplit(path, tmp_path / "images", skip_bad=True)
    assert [s["id"] for s in tolerant.skipped] == [2]
    assert tolerant.load(1) is None
    assert [s["id"] for s in tolerant.skipped] == [2, 1] and "rgb.png" in tolerant.skipped[1]["file"]
    assert tolerant.load(3) is not None
