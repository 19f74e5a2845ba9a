"""Synthetic scenes: exact annotations, the look each domain promises, determinism, speed."""

import json
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from resam_dist.data.synthetic import KINDS, make_scene, write_synthetic_coco


def _decode(segmentation, height, width):
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


@pytest.mark.parametrize("kind", KINDS)
def test_polygons_rasterise_exactly_to_the_scene_masks(kind):
    for index in range(2):
        scene = make_scene(kind, 112, 144, np.random.default_rng([3, index]))
        assert len(scene.polygons) == len(scene.masks) == len(scene.category_ids) > 0
        assert scene.masks.shape[1:] == (112, 144)
        for polygon, mask in zip(scene.polygons, scene.masks):
            assert mask.any()
            np.testing.assert_array_equal(_decode([polygon], 112, 144), mask)


@pytest.mark.parametrize("kind", KINDS)
def test_written_coco_matches_images_and_masks(tmp_path, kind):
    annotation_file = write_synthetic_coco(tmp_path, kind, num_images=2, size=(96, 128), seed=5, segmentation="mixed")
    data = json.loads(annotation_file.read_text())
    assert [c["id"] for c in data["categories"]] == sorted({c["id"] for c in data["categories"]})
    category_ids = {c["id"] for c in data["categories"]}
    assert len(data["images"]) == 2
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) > 0
    formats = set()
    for image_info in data["images"]:
        assert (image_info["width"], image_info["height"]) == (128, 96)
        with Image.open(tmp_path / "images" / image_info["file_name"]) as image:
            assert image.size == (128, 96)
            assert image.mode == ("L" if kind.endswith("sar_ships") else "RGB")
    scene = make_scene(kind, 96, 128, np.random.default_rng([5, 0]))
    first = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    assert len(first) == len(scene.masks)
    for ann, mask in zip(first, scene.masks):
        np.testing.assert_array_equal(_decode(ann["segmentation"], 96, 128), mask)
    for ann in data["annotations"]:
        mask = _decode(ann["segmentation"], 96, 128)
        formats.add(type(ann["segmentation"]).__name__)
        assert ann["iscrowd"] == 0 and ann["category_id"] in category_ids
        assert ann["area"] == int(mask.sum())
        rows, cols = np.nonzero(mask)
        assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    assert formats == {"list", "dict"}  # "mixed": polygons on image 0, RLE on image 1


@pytest.mark.parametrize("segmentation", ["rle", "rle_uncompressed"])
def test_rle_formats_encode_the_same_masks(tmp_path, segmentation):
    polygon_file = write_synthetic_coco(tmp_path / "poly", "source_shapes", 1, 80, seed=2)
    rle_file = write_synthetic_coco(tmp_path / "rle", "source_shapes", 1, 80, seed=2, segmentation=segmentation)
    polygons = json.loads(polygon_file.read_text())["annotations"]
    rles = json.loads(rle_file.read_text())["annotations"]
    assert len(polygons) == len(rles) > 0
    for a, b in zip(polygons, rles):
        counts_type = str if segmentation == "rle" else list
        assert isinstance(b["segmentation"]["counts"], counts_type)
        np.testing.assert_array_equal(_decode(a["segmentation"], 80, 80), _decode(b["segmentation"], 80, 80))


def test_generation_is_seeded_and_independent_of_the_number_of_images(tmp_path):
    write_synthetic_coco(tmp_path / "a", "buildings", 1, 64, seed=11)
    write_synthetic_coco(tmp_path / "b", "buildings", 3, 64, seed=11)
    write_synthetic_coco(tmp_path / "c", "buildings", 1, 64, seed=12)
    name = "buildings_00000.png"
    a = np.asarray(Image.open(tmp_path / "a" / "images" / name))
    b = np.asarray(Image.open(tmp_path / "b" / "images" / name))
    c = np.asarray(Image.open(tmp_path / "c" / "images" / name))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _dilate(mask, pixels):
    return ndimage.binary_dilation(mask, iterations=pixels)


def test_buildings_are_dense_touching_and_similar_in_colour():
    scene = make_scene("buildings", 192, 192, np.random.default_rng(0))
    masks = scene.masks
    assert len(masks) >= 15
    assert masks.sum(axis=0).max() == 1  # instances never overlap
    touching = similar = 0
    for k in range(len(masks)):
        ring = _dilate(masks[k], 1) & ~masks[k]
        neighbours = [j for j in range(len(masks)) if j != k and (ring & masks[j]).any()]
        touching += bool(neighbours)
        own = scene.image[masks[k]].astype(float).mean(axis=0)
        for j in neighbours:
            other = scene.image[masks[j]].astype(float).mean(axis=0)
            similar += np.abs(own - other).max() < 40
    assert touching >= 0.7 * len(masks)   # most buildings share a wall with a neighbour
    assert similar >= len(masks)           # neighbours' roofs are close in colour
    union = masks.any(axis=0)
    shadow_band = _dilate(union, 3) & ~union
    # Cast shadows: the ground right below/right of buildings is darker than open ground.
    open_ground = ~_dilate(union, 8)
    assert scene.image[shadow_band].mean() < scene.image[open_ground].mean()


def test_sar_ships_are_bright_on_speckled_sea():
    scene = make_scene("sar_ships", 160, 160, np.random.default_rng(1))
    assert scene.image.ndim == 2 and scene.image.dtype == np.uint8
    ships = scene.masks.any(axis=0)
    sea = ~_dilate(ships, 4)
    assert len(scene.masks) >= 1
    assert scene.image[ships].mean() > scene.image[sea].mean() + 40
    # Speckle: strong pixel-to-pixel variation on the sea (not a smooth background).
    sea_values = scene.image[sea].astype(float)
    assert sea_values.std() > 10
    for mask in scene.masks:
        assert 12 <= mask.sum() <= 400   # small targets


def test_source_shapes_are_separated_with_clear_contrast():
    scene = make_scene("source_shapes", 160, 160, np.random.default_rng(2))
    masks = scene.masks
    assert set(scene.category_ids) <= {1, 2, 3} and len(masks) >= 3
    for k in range(len(masks)):
        grown = _dilate(masks[k], 4)
        assert not any((grown & masks[j]).any() for j in range(len(masks)) if j != k)
        ring = _dilate(masks[k], 2) & ~masks[k]
        inside = scene.image[masks[k]].astype(float).mean(axis=0)
        outside = scene.image[ring].astype(float).mean(axis=0)
        assert np.abs(inside - outside).sum() > 100


def test_generation_is_fast():
    for kind in KINDS:
        make_scene(kind, 256, 256, np.random.default_rng(0))  # warm-up (imports, caches)
        start = time.process_time()
        for index in range(5):
            make_scene(kind, 256, 256, np.random.default_rng([0, index]))
        per_image = (time.process_time() - start) / 5
        assert per_image < 0.06, f"{kind}: {per_image * 1000:.1f} ms CPU per 256 px scene"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown synthetic scene kind"):
        make_scene("forest", 64, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 32"):
        make_scene("buildings", 16, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="segmentation format"):
        write_synthetic_coco("/nonexistent", "buildings", 1, 64, 0, segmentation="mask")


@pytest.mark.parametrize("kind", KINDS)
def test_object_scale_draws_larger_objects_with_exact_annotations(kind):
    def median_side(object_scale):
        areas = []
        for index in range(6):
            scene = make_scene(kind, 256, 256, np.random.default_rng([9, index]), object_scale=object_scale)
            for polygon, mask in zip(scene.polygons, scene.masks):
                np.testing.assert_array_equal(_decode([polygon], 256, 256), mask)
            areas += [int(mask.sum()) for mask in scene.masks]
        return float(np.sqrt(np.median(areas)))

    # lengths x2 -> sides about x2 (less where big objects no longer fit or the border clips them)
    assert median_side(2.0) > 1.3 * median_side(1.0)


def test_object_scale_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="object_scale"):
        make_scene("buildings", 64, 64, np.random.default_rng(0), object_scale=8.0)


def test_city_buildings_touch_but_each_roof_has_its_own_colour():
    """The demo's source side of the building shift: the same touching layout as `buildings`, but
    neighbours' roofs differ, so colour edges separate them (in `buildings` they do not)."""
    def neighbour_colour_gaps(kind):
        gaps, touching, count = [], 0, 0
        for index in range(4):
            scene = make_scene(kind, 192, 192, np.random.default_rng([4, index]))
            masks = scene.masks
            count += len(masks)
            for k in range(len(masks)):
                ring = _dilate(masks[k], 1) & ~masks[k]
                neighbours = [j for j in range(len(masks)) if j != k and (ring & masks[j]).any()]
                touching += bool(neighbours)
                own = scene.image[masks[k]].astype(float).mean(axis=0)
                gaps += [np.abs(own - scene.image[masks[j]].astype(float).mean(axis=0)).max() for j in neighbours]
        return float(np.median(gaps)), touching / count

    city_gap, city_touching = neighbour_colour_gaps("city_buildings")
    dense_gap, _ = neighbour_colour_gaps("buildings")
    assert city_touching >= 0.7
    assert city_gap > 2 * dense_gap


def test_rooftop_buildings_are_sparse_buildings_with_equipment_inside_the_roofs():
    """The `--target rooftops` kind: the same layout and masks as `sparse_buildings` from the same
    seed; equipment pieces repaint 15-60 % of every roof and nothing outside the buildings."""
    for index in range(3):
        plain = make_scene("sparse_buildings", 256, 256, np.random.default_rng([9, index]), object_scale=2.0)
        roofs = make_scene("rooftop_buildings", 256, 256, np.random.default_rng([9, index]), object_scale=2.0)
        assert np.array_equal(plain.masks, roofs.masks) and plain.polygons == roofs.polygons
        assert len(roofs.masks) > 0
        repainted = (plain.image != roofs.image).any(axis=2)  # H x W
        assert not (repainted & ~roofs.masks.any(axis=0)).any()
        share = [repainted[mask].mean() for mask in roofs.masks]
        assert 0.15 <= min(share) and max(share) <= 0.6, share
