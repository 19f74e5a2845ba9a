"""Read COCO-format instance segmentation splits (NWPU VHR-10, WHU building, HRSID style).

`CocoSplit(annotation_file, image_dir)` checks the JSON once when it is built (structure, ids,
categories, polygons, RLE sizes, image headers) and decodes one image at a time in `load()`.
Segmentations may be polygons, uncompressed RLE or compressed RLE; crowd annotations
(`iscrowd: 1`) are left out of the instances by default and counted. Images may be RGB, RGBA,
palette, grayscale or 16-bit/float single-channel (PNG, JPEG, TIFF); single-channel images are
expanded to 3 channels. EXIF orientation is ignored on purpose: COCO annotations refer to the
stored pixel grid.

Every problem raises `ValueError` naming the annotation file (or image file) and the id. With
`skip_bad=True` a bad image or annotation is skipped instead and recorded in `split.skipped`
as `{"reason", "kind" ("image" | "annotation"), "id", "file"}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Large GeoTIFF scenes are legitimate input; lift PIL's decompression-bomb guard.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class InstanceCrop:
    """One instance mask cropped to its tight box (keeps memory small on large scenes)."""
    annotation_id: int
    category_id: int
    x0: int                 # column of mask[0, 0] in the image
    y0: int                 # row of mask[0, 0] in the image
    mask: np.ndarray        # h x w bool, tight around the instance (at least one True pixel)


@dataclass
class CocoImage:
    """One decoded image with its (non-crowd, non-empty) instances."""
    image_id: int
    file_name: str
    image: np.ndarray          # H x W x 3 uint8
    masks: np.ndarray          # K x H x W bool
    instance_ids: np.ndarray   # K int64, COCO annotation ids
    category_ids: np.ndarray   # K int64
    num_crowd: int = 0         # crowd annotations left out
    num_empty: int = 0         # annotations whose mask has no pixel, left out


@dataclass
class _Record:
    """What construction learned about one image: its JSON entry and its good annotations."""
    info: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_image_rgb(path: Path) -> np.ndarray:
    """Decode an image file into H x W x 3 uint8 without applying EXIF orientation.

    Grayscale is expanded to 3 channels; 16-bit, 32-bit integer and float single-channel images
    (SAR GeoTIFFs) are stretched linearly from their min..max onto 0..255. Raises ValueError
    naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "L"):
                array = np.asarray(img)
            elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                array = np.asarray(img).astype(np.float64)
            elif mode in ("LA", "1"):
                array = np.asarray(img.convert("L"))
            else:  # RGBA, P, PA, CMYK, YCbCr, LAB, ...
                array = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: cannot decode image ({err})") from err
    if array.dtype != np.uint8:
        finite = np.isfinite(array)
        low = float(array[finite].min()) if finite.any() else 0.0
        high = float(array[finite].max()) if finite.any() else 0.0
        scale = 255.0 / (high - low) if high > low else 0.0
        array = np.clip((np.nan_to_num(array, nan=low) - low) * scale, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{path}: unsupported image layout {array.shape}")
    return np.ascontiguousarray(array)


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """None when `segmentation` is a valid polygon list or RLE (counts covering every pixel) of a
    height x width image, else why not."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon list"
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return "polygon must be a list of numbers"
            if len(polygon) % 2:
                return f"polygon has an odd number of coordinates ({len(polygon)})"
            if len(polygon) < 6:
                return f"polygon has fewer than 3 points ({len(polygon) // 2})"
            try:
                values = [float(v) for v in polygon]
            except OverflowError:  # an integer beyond float's range
                return "polygon has non-finite coordinates"
            if not all(math.isfinite(v) for v in values):
                return "polygon has non-finite coordinates"
            # pycocotools rasterises the polygon's whole extent: a corrupt coordinate (1e9, or -1
            # wrapped to 4294967295) would need gigabytes, or crash it
            xs, ys = values[0::2], values[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                return (f"polygon lies far outside the {width} x {height} image (x {min(xs):g} to {max(xs):g}, "
                        f"y {min(ys):g} to {max(ys):g})")
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return "RLE needs 'size' [height, width]"
        if size != [height, width]:
            return f"RLE size {size} differs from image size [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "uncompressed RLE counts must be non-negative integers"
            if sum(counts) != height * width:
                return f"uncompressed RLE counts sum to {sum(counts)}, expected {height * width}"
            return None
        if isinstance(counts, (str, bytes)):
            try:
                runs = rle_string_counts(counts)
            except (ValueError, UnicodeEncodeError) as err:
                return f"invalid compressed RLE ({err})"
            if (runs < 0).any() or int(runs.sum()) != height * width:
                return f"compressed RLE counts sum to {int(runs.sum())}, expected {height * width}"
            return None
        return "RLE needs 'counts' (list or string)"
    return "segmentation must be a polygon list or an RLE object"


class CocoSplit:
    """A COCO JSON + image folder, checked at construction, decoded per image by `load()`.

    annotation_file: COCO instances JSON. image_dir: folder that `file_name` is relative to.
    skip_bad: skip (and record in `self.skipped`) bad images/annotations instead of raising.
    include_crowd: keep `iscrowd: 1` annotations as instances (default: left out, counted).
    check_images: open every image header at construction (existence, size vs JSON).
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, *, skip_bad: bool = False,
                 include_crowd: bool = False, check_images: bool = True):
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.skip_bad = skip_bad
        self.include_crowd = include_crowd
        self.skipped: list[dict[str, Any]] = []
        self._skipped_image_ids: set[Any] = set()
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as err:
            raise ValueError(f"{self.annotation_file}: annotation file not found") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.annotation_file}: malformed JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{self.annotation_file}: top level must be a JSON object")
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.annotation_file}: missing top-level key '{key}'")
            if not isinstance(data[key], list):
                raise ValueError(f"{self.annotation_file}: '{key}' must be a list")
        self.categories = self._read_categories(data["categories"])
        self._records: dict[int, _Record] = {}
        self._read_images(data["images"])
        self._read_annotations(data["annotations"])
        if check_images:
            for image_id in list(self._records):
                self._check_image_header(image_id)
        self.image_ids: list[int] = list(self._records)

    # ---------------------------------------------------------------- construction checks
    def _bad(self, kind: str, item_id: Any, reason: str, file: str | Path | None = None) -> None:
        """Raise, or record a skip when skip_bad is on."""
        where = file if file is not None else self.annotation_file
        if not self.skip_bad:
            raise ValueError(f"{where}: {kind} id {item_id}: {reason}")
        self.skipped.append({"reason": reason, "kind": kind, "id": item_id, "file": str(where)})

    def _read_categories(self, categories: list[Any]) -> list[dict[str, Any]]:
        seen: dict[int, dict[str, Any]] = {}
        for index, category in enumerate(categories):
            if not isinstance(category, dict) or not _is_int(category.get("id")):
                raise ValueError(f"{self.annotation_file}: category at index {index} needs an integer 'id'")
            if category["id"] in seen:
                raise ValueError(f"{self.annotation_file}: duplicate category id {category['id']}")
            seen[category["id"]] = {"id": category["id"], "name": str(category.get("name", category["id"])),
                                    "supercategory": str(category.get("supercategory", ""))}
        return list(seen.values())

    def _read_images(self, images: list[Any]) -> None:
        for index, info in enumerate(images):
            if not isinstance(info, dict):
                raise ValueError(f"{self.annotation_file}: image entry at index {index} is not an object")
            image_id = info.get("id", f"<index {index}>")
            if not _is_int(info.get("id")):
                self._bad("image", image_id, "missing or non-integer 'id'")
                continue
            missing = [key for key in ("file_name", "width", "height") if key not in info]
            if missing:
                self._bad("image", image_id, f"missing key(s) {missing}")
                self._skipped_image_ids.add(image_id)
                continue
            if not isinstance(info["file_name"], str) or not info["file_name"]:
                self._bad("image", image_id, "'file_name' must be a non-empty string")
                self._skipped_image_ids.add(image_id)
                continue
            if not (_is_int(info["width"]) and _is_int(info["height"]) and info["width"] > 0 and info["height"] > 0):
                self._bad("image", image_id, f"invalid size width={info['width']!r} height={info['height']!r}")
                self._skipped_image_ids.add(image_id)
                continue
            if image_id in self._records or image_id in self._skipped_image_ids:
                # which entry the annotations of this id belong to is unknown: every entry of the
                # id is skipped, with its annotations
                self._bad("image", image_id, "duplicate image id (every image with this id is skipped)")
                self._records.pop(image_id, None)
                self._skipped_image_ids.add(image_id)
                continue
            self._records[image_id] = _Record(info=info)

    def _read_annotations(self, annotations: list[Any]) -> None:
        category_ids = {c["id"] for c in self.categories}
        seen_ids: set[int] = set()
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise ValueError(f"{self.annotation_file}: annotation entry at index {index} is not an object")
            ann_id = ann.get("id", f"<index {index}>")
            if not _is_int(ann.get("id")):
                self._bad("annotation", ann_id, "missing or non-integer 'id'")
                continue
            if ann_id in seen_ids:
                self._bad("annotation", ann_id, "duplicate annotation id")
                continue
            seen_ids.add(ann_id)
            missing = [key for key in ("image_id", "category_id", "segmentation") if key not in ann]
            if missing:
                self._bad("annotation", ann_id, f"missing key(s) {missing}")
                continue
            if _is_int(ann["image_id"]) and ann["image_id"] in self._skipped_image_ids:
                continue   # the image itself was skipped (and recorded)
            record = self._records.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
            if record is None:
                self._bad("annotation", ann_id, f"unknown image id {ann['image_id']!r}")
                continue
            if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
                self._bad("annotation", ann_id, f"unknown or non-integer category id {ann['category_id']!r}")
                continue
            if ann.get("iscrowd", 0) not in (0, 1):  # (pycocotools reads int(iscrowd); a string "0" is truthy)
                self._bad("annotation", ann_id, f"'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
                continue
            problem = segmentation_problem(ann["segmentation"], record.info["height"], record.info["width"])
            if problem is not None:
                self._bad("annotation", ann_id, problem)
                continue
            record.annotations.append(ann)

    def _check_image_header(self, image_id: int) -> None:
        info = self._records[image_id].info
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                width, height = img.size
        except FileNotFoundError:
            self._drop_image(image_id, "image file not found", path)
            return
        except (OSError, SyntaxError, ValueError) as err:
            self._drop_image(image_id, f"unreadable image ({err})", path)
            return
        if (width, height) != (info["width"], info["height"]):
            self._drop_image(image_id, f"image file is {width}x{height} but the JSON says "
                                       f"{info['width']}x{info['height']}", path)

    def _drop_image(self, image_id: int, reason: str, path: Path) -> None:
        self._bad("image", image_id, reason, file=path)
        del self._records[image_id]
        if image_id in getattr(self, "image_ids", []):
            self.image_ids.remove(image_id)

    # ---------------------------------------------------------------- per image
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, image_id: int) -> dict[str, Any]:
        """The JSON entry of an image (id, file_name, width, height, ...)."""
        return self._records[image_id].info

    def num_annotations(self, image_id: int) -> int:
        """Valid annotations of an image, crowd ones included."""
        return len(self._records[image_id].annotations)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self._records[image_id].info["file_name"]

    def read_image(self, image_id: int) -> np.ndarray:
        """H x W x 3 uint8; ValueError naming file and id when unreadable or of the wrong size."""
        info = self._records[image_id].info
        path = self.image_path(image_id)
        if not path.is_file():
            raise ValueError(f"{path}: image id {image_id}: image file not found")
        try:
            image = read_image_rgb(path)
        except ValueError as err:
            raise ValueError(f"{err} (image id {image_id})") from err
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{path}: image id {image_id}: image file is {image.shape[1]}x{image.shape[0]} "
                             f"but the JSON says {info['width']}x{info['height']}")
        return image

    def instance_crops(self, image_id: int) -> tuple[list[InstanceCrop], int, int]:
        """Instances of an image as tight mask crops, in JSON order.

        Returns (crops, num_crowd, num_empty): crowd annotations (unless include_crowd) and
        annotations whose mask has no pixel inside the image are left out and counted.
        """
        record = self._records[image_id]
        height, width = record.info["height"], record.info["width"]
        crops: list[InstanceCrop] = []
        num_crowd = num_empty = 0
        for ann in record.annotations:
            if ann.get("iscrowd", 0) and not self.include_crowd:
                num_crowd += 1
                continue
            crop = decode_instance(ann, height, width)
            if crop is None:
                num_empty += 1
                continue
            crops.append(crop)
        return crops, num_crowd, num_empty

    def load(self, image_id: int) -> CocoImage | None:
        """Decode one image and its instance masks.

        Returns None only with skip_bad=True when the image file cannot be decoded (the skip is
        recorded in `self.skipped`); otherwise decoding problems raise ValueError.
        """
        if image_id not in self._records:
            raise ValueError(f"{self.annotation_file}: unknown image id {image_id}")
        try:
            image = self.read_image(image_id)
        except ValueError as err:
            if not self.skip_bad:
                raise
            self.skipped.append({"reason": str(err), "kind": "image", "id": image_id,
                                 "file": str(self.image_path(image_id))})
            return None
        crops, num_crowd, num_empty = self.instance_crops(image_id)
        height, width = image.shape[:2]
        masks = np.zeros((len(crops), height, width), dtype=bool)  # K x H x W
        for k, crop in enumerate(crops):
            h, w = crop.mask.shape
            masks[k, crop.y0:crop.y0 + h, crop.x0:crop.x0 + w] = crop.mask
        return CocoImage(
            image_id=image_id,
            file_name=self._records[image_id].info["file_name"],
            image=image,
            masks=masks,
            instance_ids=np.array([c.annotation_id for c in crops], dtype=np.int64),
            category_ids=np.array([c.category_id for c in crops], dtype=np.int64),
            num_crowd=num_crowd,
            num_empty=num_empty,
        )


def rle_string_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (the inverse of COCO's rleToString)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    runs: list[int] = []
    position = 0
    while position < len(data):
        value = shift = 0
        more = True
        while more:
            if position >= len(data):
                raise ValueError("truncated RLE string")
            chunk = data[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"invalid character {chr(data[position])!r} in RLE string")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)


def _rle_runs(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Run lengths (column-major, zeros first) of a polygon list or an RLE of an H x W image."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        return rle_string_counts(rle["counts"])
    if isinstance(segmentation["counts"], list):
        return np.asarray(segmentation["counts"], dtype=np.int64)
    return rle_string_counts(segmentation["counts"])


def crop_from_runs(runs: np.ndarray, height: int, width: int) -> tuple[int, int, np.ndarray] | None:
    """(x0, y0, tight h x w bool mask) of run lengths over an H x W image; None when empty.

    Only the columns the instance touches are expanded, so large scenes stay cheap.
    """
    ends = np.cumsum(runs)          # column-major flat index where each run stops
    starts = ends - runs
    one_starts, one_ends = starts[1::2], ends[1::2]
    nonempty = one_ends > one_starts
    one_starts, one_ends = one_starts[nonempty], one_ends[nonempty]
    if one_starts.size == 0:
        return None
    first_col = int(one_starts.min()) // height
    last_col = int(one_ends.max() - 1) // height
    offset = first_col * height
    length = (last_col - first_col + 1) * height
    edges = np.zeros(length + 1, dtype=np.int32)
    np.add.at(edges, one_starts - offset, 1)
    np.add.at(edges, one_ends - offset, -1)
    columns = (np.cumsum(edges[:-1]) > 0).reshape(last_col - first_col + 1, height)   # w x H
    region = columns.T                                                                  # H x w
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    mask = np.ascontiguousarray(region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    return first_col + int(cols[0]), int(rows[0]), mask


def decode_instance(ann: dict[str, Any], height: int, width: int) -> InstanceCrop | None:
    """Rasterise one (already validated) annotation into a tight crop; None when empty.

    The pixels are exactly pycocotools' (`annToMask`), but never materialised at full image
    size: polygons go through pycocotools' RLE and only the touched columns are expanded.
    """
    crop = crop_from_runs(_rle_runs(ann["segmentation"], height, width), height, width)
    if crop is None:
        return None
    x0, y0, mask = crop
    return InstanceCrop(annotation_id=ann["id"], category_id=ann["category_id"], x0=x0, y0=y0, mask=mask)


def masks_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs (JSON-ready: counts as str) of K x H x W bool masks, in one call."""
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))  # H x W x K
    return [{"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}
            for rle in mask_utils.encode(fortran)]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an H x W bool mask, with `counts` as str (JSON-ready)."""
    return masks_to_rle(mask[None])[0]


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """H x W bool mask of a COCO RLE whose counts are str, bytes or a list."""
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)
