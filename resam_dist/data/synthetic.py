"""Seeded synthetic remote-sensing-like scenes with instance annotations (tests and the demo).

Seven kinds of scene, each generated from a `numpy.random.Generator` in a few milliseconds:

- `buildings`: dense blocks of touching rectangular and L-shaped buildings between roads, with
  gable-roof shading and cast shadows on textured ground. Roofs of a block share a colour with
  small variations, so a point-prompted mask easily leaks into the neighbours (the target domain
  ReSAM is made for). Instances = buildings.
- `sar_ships`: single-channel SAR-like amplitude images: gamma-distributed speckle on a dark sea,
  brighter textured land behind a wavy coastline, small bright ships with strong scatterers,
  some moored along the coast. Instances = ships.
- `source_shapes`: a plain "source" domain: well-separated rectangles, ellipses and triangles in
  saturated colours on smooth gradient backgrounds.
- `sparse_buildings`, `city_buildings` and `calm_sar_ships`: the source side of the demo's domain
  shift: buildings with gaps between them and a roof colour each; touching buildings laid out as
  in `buildings` but with a roof colour each; ships under mild (12-look) speckle.
- `rooftop_buildings`: `sparse_buildings` with rooftop equipment (solar panels, air-conditioning
  units, skylights) covering 20-45 % of every roof. The equipment belongs to the building's
  mask, so a point-prompted mask that stops at it comes out fragmented while the building's box
  still holds the whole roof: the error Requery is made to correct (the demo's default
  target, with `sar_ships`).

`object_scale` multiplies every length of a scene's layout (objects, gaps, roads, texture cells).

Every instance is generated as a polygon and rasterised once with pycocotools; the image is
painted from those rasters, so the annotations (polygons or RLE) match the pixels exactly.
`write_synthetic_coco` writes `out_dir/images/*.png` and `out_dir/annotations.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

from resam_dist.data.coco import decode_instance, encode_rle

SceneKind = Literal["buildings", "sar_ships", "source_shapes", "sparse_buildings", "city_buildings", "calm_sar_ships",
                    "rooftop_buildings"]
KINDS: tuple[str, ...] = get_args(SceneKind)

CATEGORIES: dict[str, list[dict[str, object]]] = {
    "buildings": [{"id": 1, "name": "building", "supercategory": "structure"}],
    "sar_ships": [{"id": 1, "name": "ship", "supercategory": "vessel"}],
    "sparse_buildings": [{"id": 1, "name": "building", "supercategory": "structure"}],
    "city_buildings": [{"id": 1, "name": "building", "supercategory": "structure"}],
    "rooftop_buildings": [{"id": 1, "name": "building", "supercategory": "structure"}],
    "calm_sar_ships": [{"id": 1, "name": "ship", "supercategory": "vessel"}],
    "source_shapes": [{"id": 1, "name": "rectangle", "supercategory": "shape"},
                      {"id": 2, "name": "ellipse", "supercategory": "shape"},
                      {"id": 3, "name": "triangle", "supercategory": "shape"}],
}


@dataclass
class Scene:
    """One generated scene."""
    image: np.ndarray                 # H x W x 3 uint8 (RGB kinds) or H x W uint8 (sar_ships)
    polygons: list[list[float]]       # K flat polygons [x0, y0, x1, y1, ...] in pixel corners
    masks: np.ndarray                 # K x H x W bool, the pycocotools raster of each polygon
    category_ids: list[int]           # K


# ------------------------------------------------------------------------------- helpers
def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """H x W float32 in ~[0, 1]: random values on a coarse grid (one per `cell` px), bilinear."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((width + 2 * cell, height + 2 * cell), Image.BILINEAR)
    return np.asarray(image)[cell:cell + height, cell:cell + width]


def _rasterise(polygon: list[float], height: int, width: int) -> np.ndarray | None:
    """H x W bool raster of one polygon (pycocotools' rule), None when it covers no pixel."""
    crop = decode_instance({"id": 0, "category_id": 0, "segmentation": [polygon]}, height, width)
    if crop is None:
        return None
    mask = np.zeros((height, width), dtype=bool)
    h, w = crop.mask.shape
    mask[crop.y0:crop.y0 + h, crop.x0:crop.x0 + w] = crop.mask
    return mask


def _ellipse_polygon(cx: float, cy: float, half_length: float, half_width: float, angle: float,
                     num_vertices: int) -> list[float]:
    t = np.linspace(0.0, 2.0 * np.pi, num_vertices, endpoint=False)
    u, v = half_length * np.cos(t), half_width * np.sin(t)
    xs = cx + u * np.cos(angle) - v * np.sin(angle)
    ys = cy + u * np.sin(angle) + v * np.cos(angle)
    return np.round(np.stack([xs, ys], axis=1).reshape(-1), 2).tolist()


def _finish(image: np.ndarray, polygons: list[list[float]], masks: list[np.ndarray],
            category_ids: list[int]) -> Scene:
    height, width = image.shape[:2]
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)  # K x H x W
    return Scene(image=image, polygons=polygons, masks=stacked, category_ids=category_ids)


# ------------------------------------------------------------------------------- buildings
_ROOF_COLOURS = np.array([
    [172, 92, 72],     # terracotta tiles
    [150, 150, 148],   # concrete
    [205, 200, 188],   # light membrane
    [92, 92, 98],      # dark asphalt shingles
    [112, 128, 142],   # blue-grey metal
    [160, 135, 110],   # brown
], dtype=np.float32)


def _building_scene(rng: np.random.Generator, height: int, width: int, *, dense: bool = True,
                    shared_roofs: bool = True, object_scale: float = 1.0) -> Scene:
    """dense: touching buildings (most neighbours share a wall); else gaps between them.
    shared_roofs: near-identical roofs per block (the target domain); else each building has its
    own roof colour."""
    scale = object_scale * max(height, width) / 256.0
    # Ground: grass/soil mix with low-frequency variation and fine grain.
    mix = _smooth_noise(rng, height, width, max(8, int(40 * scale)))[..., None]
    grass = np.array([84, 104, 64], dtype=np.float32)
    soil = np.array([146, 132, 104], dtype=np.float32)
    ground = grass * (1 - mix) + soil * mix + 7 * rng.standard_normal((height, width, 1), dtype=np.float32)
    ground += 3 * rng.standard_normal((height, width, 3), dtype=np.float32)
    # Trees: dark green blobs on the ground (not instances).
    tree_field = _smooth_noise(rng, height, width, max(3, int(6 * scale)))
    trees = tree_field > 0.82
    ground[trees] = ground[trees] * 0.45 + np.array([30, 55, 28], dtype=np.float32)

    # Roads split the scene into blocks.
    road_width = int(rng.integers(8, 13) * scale)
    road = np.zeros((height, width), dtype=bool)
    xs_cuts = [0]
    ys_cuts = [0]
    for cuts, extent in ((xs_cuts, width), (ys_cuts, height)):
        position = int(rng.integers(int(70 * scale), int(130 * scale)))
        while position < extent - int(50 * scale):
            cuts.append(position)
            position += int(rng.integers(int(90 * scale), int(150 * scale)))
        cuts.append(extent)
    for x in xs_cuts[1:-1]:
        road[:, x:x + road_width] = True
    for y in ys_cuts[1:-1]:
        road[y:y + road_width, :] = True
    asphalt = np.array([98, 98, 102], dtype=np.float32) + 4 * rng.standard_normal((height, width, 1), dtype=np.float32)
    ground = np.where(road[..., None], asphalt, ground)

    polygons: list[list[float]] = []
    masks: list[np.ndarray] = []
    roofs: list[np.ndarray] = []
    margin = max(2, int(4 * scale))
    for bx0, bx1 in zip(xs_cuts[:-1], xs_cuts[1:]):
        for by0, by1 in zip(ys_cuts[:-1], ys_cuts[1:]):
            left = bx0 + (road_width if bx0 > 0 else 0) + margin
            top = by0 + (road_width if by0 > 0 else 0) + margin
            right, bottom = bx1 - margin, by1 - margin
            block_colour = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))]
            y = top
            while y < bottom - int(10 * scale):
                row_height = min(int(rng.integers(int(20 * scale), int(40 * scale) + 1)), bottom - y)
                x = left
                while x < right - int(8 * scale):
                    building_width = min(int(rng.integers(int(14 * scale), int(38 * scale) + 1)), right - x)
                    if building_width < int(6 * scale) or row_height < int(6 * scale):
                        break
                    x0, y0, x1, y1 = x, y, x + building_width, y + row_height
                    # Integer-cornered axis-aligned polygons: pycocotools' raster of such a
                    # polygon is exactly the pixel slices below (tests check it), so no
                    # rasterisation call per building is needed.
                    mask = np.zeros((height, width), dtype=bool)
                    mask[y0:y1, x0:x1] = True
                    polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
                    # Sometimes an L shape: cut a corner out.
                    if rng.random() < 0.3 and building_width >= 12 * scale and row_height >= 12 * scale:
                        cut_w = max(1, int(building_width * rng.uniform(0.35, 0.55)))
                        cut_h = max(1, int(row_height * rng.uniform(0.35, 0.55)))
                        if rng.random() < 0.5:  # notch at the bottom-right corner
                            polygon = [x0, y0, x1, y0, x1, y1 - cut_h, x1 - cut_w, y1 - cut_h, x1 - cut_w, y1, x0, y1]
                            mask[y1 - cut_h:y1, x1 - cut_w:x1] = False
                        else:                   # notch at the top-left corner
                            polygon = [x0 + cut_w, y0, x1, y0, x1, y1, x0, y1, x0, y0 + cut_h, x0 + cut_w, y0 + cut_h]
                            mask[y0:y0 + cut_h, x0:x0 + cut_w] = False
                    polygons.append([float(v) for v in polygon])
                    masks.append(mask)
                    colour = block_colour if shared_roofs else _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))]
                    roofs.append(np.clip(colour + rng.normal(0, 7, 3), 0, 255).astype(np.float32))
                    gap_x = rng.random() < 0.15 if dense else True
                    gap_y = rng.random() < 0.5 if dense else True
                    x = x1 + (int(rng.integers(3, 9) * scale) if gap_x else 0)
                y += row_height + (int(rng.integers(3, 8) * scale) if gap_y else 0)

    image = ground
    if masks:
        union = np.zeros((height, width), dtype=bool)
        for mask in masks:
            union |= mask
        # Cast shadows: sun from the upper left, shadows fall to the lower right on the ground.
        shift = max(2, int(rng.integers(3, 6) * scale))
        shadow = np.zeros_like(union)
        shadow[shift:, shift:] = union[:-shift, :-shift]
        shadow &= ~union
        image = np.where(shadow[..., None], image * 0.48, image)
        for mask, roof, polygon in zip(masks, roofs, polygons):
            xs, ys = polygon[0::2], polygon[1::2]
            x0, y0, x1, y1 = int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys))
            region = mask[y0:y1, x0:x1]           # h x w, the building's box
            # Gable roof: the half towards the sun is lighter, the ridge runs along the long side.
            shade = np.full((y1 - y0, x1 - x0, 1), 0.9, dtype=np.float32)
            if x1 - x0 >= y1 - y0:
                shade[: (y1 - y0) // 2] = 1.08
            else:
                shade[:, : (x1 - x0) // 2] = 1.08
            box = image[y0:y1, x0:x1]
            box[region] = (roof * shade)[region]
        image[union] += 3 * rng.standard_normal((int(union.sum()), 3), dtype=np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return _finish(image, polygons, masks, [1] * len(masks))


_EQUIPMENT_COLOURS = np.array([
    [38, 48, 78],      # solar panels
    [222, 222, 218],   # air-conditioning units
    [120, 170, 190],   # skylights
], dtype=np.float32)


def _rooftop_scene(rng: np.random.Generator, height: int, width: int, *, object_scale: float = 1.0,
                   coverage: tuple[float, float] = (0.2, 0.45)) -> Scene:
    """Buildings with gaps and a roof colour each, then rectangles of rooftop equipment painted
    inside every building's mask until they cover a random 20-45 % of it (at most 12 pieces).
    The masks and polygons are the buildings' own: the equipment is part of the building."""
    scene = _building_scene(rng, height, width, dense=False, shared_roofs=False, object_scale=object_scale)
    image = scene.image.astype(np.float32)  # H x W x 3
    for mask in scene.masks:                # H x W bool
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        box_h, box_w = y1 - y0, x1 - x0
        roof = mask[y0:y1, x0:x1]            # box_h x box_w bool
        roof_pixels = image[y0:y1, x0:x1]    # box_h x box_w x 3, a view
        wanted, covered = rng.uniform(*coverage) * roof.sum(), 0
        for _ in range(12):
            if covered >= wanted:
                break
            piece_h = int(rng.integers(max(2, box_h // 6), max(3, box_h // 2)))
            piece_w = int(rng.integers(max(2, box_w // 6), max(3, box_w // 2)))
            top = int(rng.integers(1, max(2, box_h - piece_h)))
            left = int(rng.integers(1, max(2, box_w - piece_w)))
            piece = np.zeros_like(roof)
            piece[top:top + piece_h, left:left + piece_w] = True
            piece &= roof
            colour = _EQUIPMENT_COLOURS[rng.integers(len(_EQUIPMENT_COLOURS))]
            roof_pixels[piece] = colour + rng.normal(0.0, 5.0, (int(piece.sum()), 3))
            covered += int(piece.sum())
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(image=image, polygons=scene.polygons, masks=scene.masks, category_ids=scene.category_ids)


# ------------------------------------------------------------------------------- SAR ships
def _sar_scene(rng: np.random.Generator, height: int, width: int, *, looks: float = 2.0,
               object_scale: float = 1.0) -> Scene:
    """looks: equivalent number of looks of the speckle (2: heavy, the target domain; 12: mild)."""
    scale = object_scale * max(height, width) / 256.0
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    # Coastline: land on one side behind a wavy line (or open sea in some scenes).
    side = int(rng.integers(5))          # 0 top, 1 bottom, 2 left, 3 right, 4 open sea
    depth = rows if side in (0, 1) else cols
    extent = height if side in (0, 1) else width
    length = width if side in (0, 1) else height
    u = np.arange(length, dtype=np.float32)
    coast = extent * rng.uniform(0.18, 0.35) * np.ones_like(u)
    for _ in range(3):
        coast += rng.uniform(2, 9) * scale * np.sin(2 * np.pi * u / (rng.uniform(40, 160) * scale) + rng.uniform(0, 6.3))
    coast_map = coast[:, None].T if side in (0, 1) else coast[:, None]       # broadcast along `along`
    distance_into_sea = (depth - coast_map) if side in (0, 2) else ((extent - 1 - depth) - coast_map)
    land = (distance_into_sea < 0) if side != 4 else np.zeros((height, width), dtype=bool)

    # Mean backscatter: dark sea with slow swell, bright structured land.
    swell = 0.8 + 0.4 * _smooth_noise(rng, height, width, max(8, int(32 * scale)))
    land_texture = 3.0 + 9.0 * _smooth_noise(rng, height, width, max(3, int(10 * scale))) ** 2
    intensity = np.where(land, land_texture, swell).astype(np.float32)
    if land.any():  # bright point scatterers (buildings, cranes) on land
        land_rows, land_cols = np.nonzero(land)
        picks = rng.choice(land_rows.size, size=max(1, land_rows.size // 150))
        intensity[land_rows[picks], land_cols[picks]] *= rng.uniform(4, 15, size=picks.size)

    polygons: list[list[float]] = []
    masks: list[np.ndarray] = []
    occupied = land.copy()
    num_ships = int(rng.integers(3, 14))
    attempts = 0
    while len(masks) < num_ships and attempts < num_ships * 20:
        attempts += 1
        half_length = rng.uniform(5, 12) * scale
        half_width = rng.uniform(1.6, 3.2) * scale
        if side != 4 and rng.random() < 0.4:
            # Moored: a few pixels off the coast, parallel to it.
            position = rng.uniform(0.1, 0.9) * length
            offset = coast[int(position)] + half_width + rng.uniform(2, 6) * scale
            if side in (0, 1):
                cx, cy = position, offset if side == 0 else height - 1 - offset
                angle = float(np.arctan2(coast[min(int(position) + 4, length - 1)] - coast[int(position)], 4.0))
                angle = angle if side == 0 else -angle
            else:
                cy, cx = position, offset if side == 2 else width - 1 - offset
                step = coast[min(int(position) + 4, length - 1)] - coast[int(position)]
                angle = float(np.arctan2(4.0, step if side == 2 else -step))
        else:
            cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
            angle = rng.uniform(0, np.pi)
        polygon = _ellipse_polygon(cx, cy, half_length, half_width, angle, num_vertices=12)
        mask = _rasterise(polygon, height, width)
        if mask is None or mask.sum() < 12:
            continue
        grown = mask.copy()  # keep one pixel of sea between ships and from the coast
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:]
        if (grown & occupied).any():
            continue
        occupied |= grown
        polygons.append(polygon)
        masks.append(mask)
        hull = rng.uniform(12, 30)
        intensity = np.where(mask, hull, intensity)
        ship_rows, ship_cols = np.nonzero(mask)
        picks = rng.choice(ship_rows.size, size=max(1, ship_rows.size // 8))
        intensity[ship_rows[picks], ship_cols[picks]] *= rng.uniform(2, 6, size=picks.size)

    # Multiplicative speckle: intensity x Gamma(L, 1/L), L looks.
    speckled = intensity * rng.gamma(looks, 1.0 / looks, size=(height, width)).astype(np.float32)
    decibels = 10.0 * np.log10(np.maximum(speckled, 1e-4))
    image = np.clip((decibels + 12.0) * (255.0 / 32.0), 0, 255).astype(np.uint8)
    return _finish(image, polygons, masks, [1] * len(masks))


# ------------------------------------------------------------------------------- source shapes
def _shapes_scene(rng: np.random.Generator, height: int, width: int, *, object_scale: float = 1.0) -> Scene:
    scale = object_scale * max(height, width) / 256.0
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    colour_a = rng.uniform(170, 235, 3).astype(np.float32)
    colour_b = rng.uniform(170, 235, 3).astype(np.float32)
    weight = rng.uniform(0.2, 0.8)
    ramp = weight * rows + (1 - weight) * cols
    image = colour_a * (1 - ramp) + colour_b * ramp + 2 * rng.standard_normal((height, width, 1), dtype=np.float32)

    polygons: list[list[float]] = []
    masks: list[np.ndarray] = []
    category_ids: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    gap = 10 * scale
    num_shapes = int(rng.integers(3, 8))
    attempts = 0
    while len(masks) < num_shapes and attempts < 200:
        attempts += 1
        radius = rng.uniform(12, 30) * scale
        cx = rng.uniform(radius + 2, width - radius - 2)
        cy = rng.uniform(radius + 2, height - radius - 2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if any(box[0] < b[2] + gap and b[0] < box[2] + gap and box[1] < b[3] + gap and b[1] < box[3] + gap
               for b in boxes):
            continue
        category = int(rng.integers(1, 4))
        angle = rng.uniform(0, np.pi)
        if category == 1:    # rectangle: an ellipse polygon with 4 vertices is a rotated rectangle
            aspect = rng.uniform(0.5, 1.0)
            half_x, half_y = radius * 0.7071, radius * 0.7071 * aspect
            corners = np.array([[-half_x, -half_y], [half_x, -half_y], [half_x, half_y], [-half_x, half_y]])
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            points = corners @ rotation.T + np.array([cx, cy])
            polygon = np.round(points.reshape(-1), 2).tolist()
        elif category == 2:  # ellipse
            polygon = _ellipse_polygon(cx, cy, radius, radius * rng.uniform(0.55, 1.0), angle, num_vertices=28)
        else:                # triangle
            polygon = _ellipse_polygon(cx, cy, radius, radius, angle, num_vertices=3)
        mask = _rasterise(polygon, height, width)
        if mask is None:
            continue
        # A saturated colour far from the local background.
        background = image[int(cy), int(cx)]
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        for _ in range(20):
            if np.abs(colour - background).sum() > 220:
                break
            colour = rng.uniform(0, 255, 3).astype(np.float32)
        image = np.where(mask[..., None], colour, image)
        boxes.append(box)
        polygons.append(polygon)
        masks.append(mask)
        category_ids.append(category)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return _finish(image, polygons, masks, category_ids)


_GENERATORS = {
    "buildings": _building_scene, "sar_ships": _sar_scene, "source_shapes": _shapes_scene,
    "sparse_buildings": partial(_building_scene, dense=False, shared_roofs=False),
    "city_buildings": partial(_building_scene, shared_roofs=False),
    "calm_sar_ships": partial(_sar_scene, looks=12.0),
    "rooftop_buildings": _rooftop_scene,
}


def make_scene(kind: str, height: int, width: int, rng: np.random.Generator, *,
               object_scale: float = 1.0) -> Scene:
    """Generate one scene of `kind` (one of KINDS). object_scale multiplies every length of the
    scene's layout (object sizes, gaps, roads, texture cells): 2.0 draws objects twice as large
    in the same image size."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown synthetic scene kind {kind!r}; choose one of {KINDS}")
    if height < 32 or width < 32:
        raise ValueError(f"synthetic scenes need at least 32 x 32 pixels, got {height} x {width}")
    if not 0.25 <= object_scale <= 4.0:
        raise ValueError(f"object_scale must lie in [0.25, 4], got {object_scale}")
    return _GENERATORS[kind](rng, height, width, object_scale=object_scale)


def write_synthetic_coco(out_dir: str | Path, kind: str, num_images: int, size: int | tuple[int, int],
                         seed: int, *, segmentation: Literal["polygon", "rle", "rle_uncompressed", "mixed"] = "polygon",
                         first_image_id: int = 1, first_annotation_id: int = 1, object_scale: float = 1.0,
                         annotation_name: str = "annotations.json") -> Path:
    """Write `num_images` scenes of `kind` as COCO JSON + PNG images; return the JSON path.

    size: side length, or (height, width). Image i uses the seed sequence (seed, i), so a scene
    does not depend on how many are written. segmentation: "polygon", "rle" (compressed, counts
    as str), "rle_uncompressed" (counts as a list) or "mixed" (polygons on even images, RLE on
    odd ones). Files: `out_dir/images/<kind>_<i:05d>.png`, `out_dir/<annotation_name>`.
    """
    if segmentation not in ("polygon", "rle", "rle_uncompressed", "mixed"):
        raise ValueError(f"unknown segmentation format {segmentation!r}")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    annotation_id = first_annotation_id
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        scene = make_scene(kind, height, width, rng, object_scale=object_scale)
        image_id = first_image_id + index
        file_name = f"{kind}_{index:05d}.png"
        Image.fromarray(scene.image).save(image_dir / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        fmt = segmentation if segmentation != "mixed" else ("polygon" if index % 2 == 0 else "rle")
        for polygon, mask, category_id in zip(scene.polygons, scene.masks, scene.category_ids):
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            if fmt == "polygon":
                seg: object = [polygon]
            elif fmt == "rle":
                seg = encode_rle(mask)
            else:
                seg = {"size": [height, width], "counts": _uncompressed_counts(mask)}
            annotations.append({
                "id": annotation_id, "image_id": image_id, "category_id": int(category_id),
                "segmentation": seg, "area": int(mask.sum()), "iscrowd": 0,
                "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)],
            })
            annotation_id += 1
    annotation_file = out_dir / annotation_name
    data = {"info": {"description": f"synthetic {kind} scenes", "seed": seed},
            "images": images, "annotations": annotations, "categories": CATEGORIES[kind]}
    annotation_file.write_text(json.dumps(data), encoding="utf-8")   # dumps: the fast C encoder
    return annotation_file


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of an H x W bool mask (column-major, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)  # column-major order
    changes = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(boundaries).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return [int(c) for c in counts]
