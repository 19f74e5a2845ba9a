"""Fully supervised pretraining of a SAM on a COCO split: the demo's stand-in for SAM's own
pretraining (no SAM weights can be had on these machines).

Every parameter trains; prompts alternate between point prompts (1-3 positives and as many
negatives, as in ReSAM training) and jittered ground-truth boxes (as Requery uses them), and
images are flipped at random. With `photometric` > 0 that fraction of the images is also
distorted with the strong view's kinds of operation (`photometric_distortion`), which makes the
model robust to appearance changes (a stand-in for what real SAM gets from its varied data).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from resam_dist.data.batch import valid_from_counts
from resam_dist.data.coco import CocoImage, CocoSplit
from resam_dist.model.build import normalise_pixels
from resam_dist.model.sam import PromptableSam
from resam_dist.resam.losses import mask_losses
from resam_dist.resam.prompts import masks_to_boxes, sample_points


@dataclass
class SceneBatch:
    images: torch.Tensor      # B x 3 x S x S float32, SAM-normalised
    masks: torch.Tensor       # B x K x S x S bool
    points: torch.Tensor      # B x K x 2N x 2 float32
    point_labels: torch.Tensor  # B x K x 2N int64
    boxes: torch.Tensor       # B x K x 4 float32
    counts: torch.Tensor      # B int64


def normalise(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 (or H x W) uint8 -> 3 x H x W float32 with SAM's mean/std."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # 3 x H x W
    return normalise_pixels(tensor)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 (or H x W, made RGB) uint8 -> H x W x 3 uint8, distorted like the DALI strong view
    (`resam_dist.data.pipeline`): equalize, posterize (4-6 bits), solarize (threshold 160-240),
    sharpen and shadow-like darkening, each with probability 1/2, then brightness and contrast
    (x0.7-1.3 each) always. torchvision's operators; parameters drawn from `rng`."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # 3 x H x W uint8, a copy
    if rng.random() < 0.5:
        pixels = TF.equalize(pixels)
    if rng.random() < 0.5:
        pixels = TF.posterize(pixels, int(rng.choice([4, 5, 6])))
    if rng.random() < 0.5:
        pixels = TF.solarize(pixels, float(rng.uniform(160, 240)))
    if rng.random() < 0.5:
        pixels = TF.adjust_sharpness(pixels, float(rng.uniform(1.5, 3.0)))
    pixels = TF.adjust_brightness(pixels, float(rng.uniform(0.7, 1.3)))
    pixels = TF.adjust_contrast(pixels, float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.5:  # a 4 x 4 random field, smoothly upsampled, thresholded into soft patches
        field = torch.from_numpy(rng.random((1, 1, 4, 4), dtype=np.float32))
        field = F.interpolate(field, size=pixels.shape[1:], mode="bilinear", align_corners=False)[0]  # 1 x H x W
        patches = ((field - 0.55) * 5.0).clamp(0.0, 1.0)
        pixels = (pixels.float() * (1.0 - float(rng.uniform(0.3, 0.6)) * patches)).clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def split_batch(loaded: list[CocoImage], size: int, num_points: int, rng: np.random.Generator,
                max_instances: int, photometric: float = 0.0) -> SceneBatch:
    """A batch of decoded split images (size x size each, as the synthetic domains are) with
    random flips, `photometric_distortion` of a `photometric` fraction of them, and freshly
    sampled prompts. The decoded images are not modified."""
    batch = len(loaded)
    max_k = max(1, max(min(item.masks.shape[0], max_instances) for item in loaded))
    images = torch.zeros(batch, 3, size, size)
    masks = torch.zeros(batch, max_k, size, size, dtype=torch.bool)
    points = torch.zeros(batch, max_k, 2 * num_points, 2)
    labels = torch.full((batch, max_k, 2 * num_points), -1, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    for b, item in enumerate(loaded):
        if item.image.shape[:2] != (size, size):
            raise ValueError(f"pretraining expects {size} x {size} images, {item.file_name} is "
                             f"{item.image.shape[0]} x {item.image.shape[1]}")
        image, instance_masks = item.image, item.masks
        if instance_masks.shape[0] > max_instances:  # a random subset of the instances per step
            instance_masks = instance_masks[np.sort(rng.choice(instance_masks.shape[0], max_instances, replace=False))]
        if rng.random() < 0.5:
            image, instance_masks = image[:, ::-1], instance_masks[:, :, ::-1]
        if photometric > 0 and rng.random() < photometric:
            image = photometric_distortion(image, rng)
        images[b] = normalise(image)
        counts[b] = instance_masks.shape[0]
        for k, mask in enumerate(instance_masks):
            masks[b, k] = torch.from_numpy(np.ascontiguousarray(mask))
            pos, neg = sample_points(mask, num_points, rng)
            points[b, k] = torch.from_numpy(np.concatenate([pos, neg]))
            labels[b, k, :num_points] = 1
            labels[b, k, num_points:] = 0
    return SceneBatch(images, masks, points, labels, masks_to_boxes(masks), counts)


def supervised_loss(model: PromptableSam, batch: SceneBatch, use_boxes: bool, box_jitter: float,
                    rng: np.random.Generator) -> torch.Tensor:
    """20 focal + dice + iou_mse of the model's masks against the ground truth."""
    valid = valid_from_counts(batch.counts, batch.masks.shape[1])  # B x K
    features = model.encode(batch.images)
    if use_boxes:
        size = model.image_size
        wh = (batch.boxes[..., 2:] - batch.boxes[..., :2]).repeat(1, 1, 2)  # B x K x 4
        noise = torch.from_numpy(rng.normal(0.0, box_jitter, batch.boxes.shape).astype(np.float32))
        boxes = (batch.boxes + noise * wh).clamp(0, size)
        logits, iou = model.decode(features, batch.counts, boxes=boxes)
    else:
        logits, iou = model.decode(features, batch.counts, points=batch.points, point_labels=batch.point_labels)
    focal, dice, iou_mse = mask_losses(logits, iou, batch.masks, valid)
    return 20.0 * focal + dice + iou_mse


def pretrain(model: PromptableSam, *, split: CocoSplit, steps: int, images_per_step: int, lr: float,
             seed: int, max_instances: int = 16, keep_decoded: bool = False, log_every: int = 50,
             photometric: float = 0.0) -> list[float]:
    """Train every parameter of `model` on the images of `split`; returns the per-step losses.
    A non-finite loss stops it with a RuntimeError (before the step: the model keeps its weights).

    photometric: the fraction of images distorted by `photometric_distortion` (0: none).

    keep_decoded: keep every image of `split` in memory once decoded (its pixels and instance
    masks: about 120 MB for the demo's 128 source images of 256 x 256) instead of decoding
    `images_per_step` images again at every step. The result is the same either way."""
    if not 0.0 <= photometric <= 1.0:
        raise ValueError(f"pretrain: photometric is the fraction of distorted images, in [0, 1]; got {photometric}")
    if steps < 1 or images_per_step < 1:
        raise ValueError(f"pretrain: steps and images_per_step must be at least 1, got {steps} and {images_per_step}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    load = functools.cache(split.load) if keep_decoded else split.load  # image id -> decoded image
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        image_ids = [int(i) for i in rng.choice(split.image_ids, size=images_per_step, replace=False)]
        num_points = int(rng.integers(1, 4))
        batch = split_batch([load(image_id) for image_id in image_ids], model.image_size, num_points, rng,
                            max_instances, photometric)
        loss = supervised_loss(model, batch, use_boxes=bool(step % 2), box_jitter=0.05, rng=rng)
        if not torch.isfinite(loss):  # a diverged model must not be cached as a teacher
            raise RuntimeError(f"pretraining diverged: loss {float(loss.detach())} at step {step + 1} of {steps} "
                               f"(images {image_ids}); lower the learning rate ({lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"pretrain step {step + 1}/{steps} loss {recent:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return losses
