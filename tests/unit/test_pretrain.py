"""Source-domain pretraining (the demo's stand-in for SAM's own pretraining): every parameter
in use trains, the run is reproducible from its seed (keeping decoded images or not), and
images of the wrong size are refused."""

import math

import numpy as np
import pytest
import torch

from resam_dist.data.coco import CocoSplit
from resam_dist.demo import write_domain
from resam_dist.model.build import build_sam
from resam_dist.train.pretrain import photometric_distortion, pretrain, split_batch


@pytest.fixture(scope="module")
def source_split(tmp_path_factory):
    path = write_domain(tmp_path_factory.mktemp("source"), {"source_shapes": 2, "sparse_buildings": 2},
                        size=256, seed=3, object_scale=2.0)
    return CocoSplit(path, path.parent / "images")


def _pretrained(split, seed, keep_decoded=False):
    model = build_sam("tiny", seed=0)
    losses = pretrain(model, split=split, steps=3, images_per_step=2, lr=1e-3, seed=seed, max_instances=4,
                      keep_decoded=keep_decoded, log_every=0)
    return model, losses


@pytest.fixture
def one_thread():
    """Reproducibility is checked on one thread. With 2 threads, beside another busy process, the
    third loss once differed in the 7th digit (1 run in 6); with 1 thread every run matched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pretraining_trains_every_parameter_in_use_and_is_reproducible(source_split, one_thread):
    initial = build_sam("tiny", seed=0).state_dict()
    model, losses = _pretrained(source_split, seed=0)
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert not model.training
    trained = model.state_dict()
    unchanged = {name for name, parameter in model.named_parameters() if torch.equal(parameter, initial[name])}
    # no mask prompts, and only the single-mask output is decoded: those parameters take no part
    unused = {name for name in initial if name.startswith("prompt_encoder.mask_downscaling.")
              or name.startswith(tuple(f"mask_decoder.output_hypernetworks_mlps.{i}." for i in (1, 2, 3)))}
    assert unused and unchanged == unused
    for keep_decoded in (False, True):  # decoding once and keeping the images changes nothing
        again, losses_again = _pretrained(source_split, seed=0, keep_decoded=keep_decoded)
        assert losses_again == losses
        assert all(torch.equal(trained[name], value) for name, value in again.state_dict().items())
    _, other_losses = _pretrained(source_split, seed=1)
    assert other_losses != losses


def test_split_batch_pads_instances_and_leaves_the_decoded_images_alone(source_split):
    rng = np.random.default_rng(0)
    loaded = [source_split.load(image_id) for image_id in list(source_split.image_ids)[:2]]
    pixels, masks = [item.image.copy() for item in loaded], [item.masks.copy() for item in loaded]
    batch = split_batch(loaded, 256, num_points=2, rng=rng, max_instances=3)
    assert batch.images.shape == (2, 3, 256, 256) and batch.masks.shape[:2] == (2, 3)
    assert batch.points.shape == (2, 3, 4, 2) and batch.point_labels.shape == (2, 3, 4)
    for b, count in enumerate(batch.counts.tolist()):
        assert 1 <= count <= 3
        assert batch.masks[b, :count].flatten(1).any(1).all()  # every real instance has pixels
        assert not batch.masks[b, count:].any() and (batch.point_labels[b, count:] == -1).all()
        assert (batch.point_labels[b, :count, :2] == 1).all() and (batch.point_labels[b, :count, 2:] == 0).all()
    for _ in range(8):  # random flips and instance subsets never write into the decoded arrays
        split_batch(loaded, 256, num_points=1, rng=rng, max_instances=3)
    assert all(np.array_equal(item.image, p) and np.array_equal(item.masks, m)
               for item, p, m in zip(loaded, pixels, masks))
    with pytest.raises(ValueError, match="pretraining expects 128 x 128 images"):
        split_batch(loaded, 128, num_points=1, rng=rng, max_instances=3)


def test_photometric_distortion_changes_appearance_only_and_follows_its_rng(source_split):
    item = source_split.load(list(source_split.image_ids)[0])
    before = item.image.copy()
    outputs = [photometric_distortion(item.image, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    for out in outputs:
        assert out.shape == item.image.shape and out.dtype == np.uint8
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])
    assert np.array_equal(item.image, before)  # the decoded image is not modified
    changed = [not np.array_equal(photometric_distortion(item.image, np.random.default_rng(s)), item.image)
               for s in range(8)]
    assert all(changed)  # brightness and contrast always apply
    grey = photometric_distortion(item.image[:, :, 0].copy(), np.random.default_rng(0))  # SAR scenes are H x W
    assert grey.shape == item.image.shape and grey.dtype == np.uint8


def test_photometric_fraction_in_batches(source_split):
    loaded = [source_split.load(image_id) for image_id in list(source_split.image_ids)[:2]]
    plain = split_batch(loaded, 256, num_points=1, rng=np.random.default_rng(4), max_instances=3)
    # photometric 0 draws nothing more from the rng: the batches (and cached teachers) stay as before
    again = split_batch(loaded, 256, num_points=1, rng=np.random.default_rng(4), max_instances=3, photometric=0.0)
    assert torch.equal(plain.images, again.images) and torch.equal(plain.points, again.points)
    distorted = split_batch(loaded, 256, num_points=1, rng=np.random.default_rng(4), max_instances=3, photometric=1.0)
    # the first image keeps its instances and flip (drawn before the distortion) with other pixels
    assert torch.equal(plain.masks[0], distorted.masks[0]) and not torch.equal(plain.images[0], distorted.images[0])
    with pytest.raises(ValueError, match="photometric is the fraction"):
        pretrain(build_sam("tiny", seed=0), split=source_split, steps=1, images_per_step=1, lr=1e-3, seed=0,
                 photometric=1.5)


def test_bad_settings_and_a_diverged_run_are_refused(source_split):
    with pytest.raises(ValueError, match="steps and images_per_step must be at least 1, got 0 and 1"):
        pretrain(build_sam("tiny", seed=0), split=source_split, steps=0, images_per_step=1, lr=1e-3, seed=0)
    model = build_sam("tiny", seed=0)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(float("nan"))  # the iou term goes NaN
    with pytest.raises(RuntimeError, match=r"pretraining diverged: loss nan at step 1 of 2"):
        pretrain(model, split=source_split, steps=2, images_per_step=1, lr=1e-3, seed=0, max_instances=2,
                 log_every=0)
