"""PointSAM-style baseline: NPC, the teacher graph, the prototype store, matching, state, steps."""

import io

import numpy as np
import pytest
import torch

from resam_dist.config import Config
from resam_dist.data.batch import Batch
from resam_dist.model.build import build_sam
from resam_dist.model.lora import apply_lora
from resam_dist.resam.pointsam import (PointSamState, calibrated_prompts, cluster_prototypes, match_prototypes,
                                       pairwise_mask_iou, pointsam_step, prototype_loss, sample_point_features)
from resam_dist.resam.prompts import masks_to_boxes, sample_points

def _tiny_lora_model() -> torch.nn.Module:
    model = build_sam("tiny", seed=0)
    apply_lora(model, rank=4, alpha=4.0, dropout=0.0, start_block=2, seed=0)
    return model.train()


def _batch(image_size: int = 256, num_images: int = 1, num_instances: int = 3, seed: int = 0) -> Batch:
    """Squares of 64 px at random places, one positive and one negative point each."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_images, num_instances, image_size, image_size), dtype=bool)
    points = np.zeros((num_images, num_instances, 2, 2), dtype=np.float32)
    for b in range(num_images):
        for k in range(num_instances):
            x, y = rng.integers(0, image_size - 64, size=2)
            masks[b, k, y:y + 64, x:x + 64] = True
            positives, negatives = sample_points(masks[b, k], 1, rng)
            points[b, k, 0], points[b, k, 1] = positives[0], negatives[0]
    generator = torch.Generator().manual_seed(seed)
    weak = torch.randn(num_images, 3, image_size, image_size, generator=generator)
    gt = torch.from_numpy(masks)
    return Batch(weak=weak, strong=weak * 0.8 + 0.1, gt_masks=gt, points=torch.from_numpy(points),
                 point_labels=torch.tensor([1, 0]).repeat(num_images, num_instances, 1),
                 boxes=masks_to_boxes(gt), counts=torch.full((num_images,), num_instances),
                 image_sizes=torch.tensor([[image_size, image_size]] * num_images),
                 keys=[f"img{b}" for b in range(num_images)])


def _pointsam_config(**resam) -> Config:
    cfg = Config()
    cfg.resam.method = "pointsam"
    for key, value in resam.items():
        setattr(cfg.resam, key, value)
    return cfg


def _lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- NPC


def test_npc_takes_negatives_from_overlapping_instances_only():
    masks = torch.zeros(1, 5, 10, 10, dtype=torch.bool)
    masks[0, 0, 0:4, 0:4] = True   # overlaps 1 (IoU 9/23) and 3 (IoU 4/28)
    masks[0, 1, 1:5, 1:5] = True
    masks[0, 2, 8:10, 8:10] = True  # overlaps nothing
    masks[0, 3, 2:4, 2:10] = True   # overlaps 0 (IoU 4/28) and 1 (IoU 6/26)
    masks[0, 4, 0:4, 0:4] = True    # padding instance: identical to 0 but must be ignored
    positives = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 1, 2) + 100  # B x K x 1 x 2
    points, labels, overlap = calibrated_prompts(positives, masks, torch.tensor([4]), iou_threshold=0.1)

    expected_overlap = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0],
                                     [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(overlap[0], expected_overlap)
    assert points.shape == (1, 5, 3, 2) and labels.shape == (1, 5, 3)  # 1 positive + 2 neighbours
    # instance 0: own positive, then the positives of 1 and 3 as negatives
    assert labels[0, 0].tolist() == [1, 0, 0]
    assert torch.equal(points[0, 0], torch.stack([positives[0, 0, 0], positives[0, 1, 0], positives[0, 3, 0]]))
    assert labels[0, 1].tolist() == [1, 0, 0]
    assert torch.equal(points[0, 1, 1:], torch.stack([positives[0, 0, 0], positives[0, 3, 0]]))
    # instance 2 overlaps nothing: its positive only, the rest is padding (-1, zero coordinates)
    assert labels[0, 2].tolist() == [1, -1, -1]
    assert torch.equal(points[0, 2, 1:], torch.zeros(2, 2))
    assert labels[0, 3].tolist() == [1, 0, 0]
    assert torch.equal(points[0, 3, 1:], torch.stack([positives[0, 0, 0], positives[0, 1, 0]]))


def test_npc_threshold_and_no_overlap_gives_positives_only():
    masks = torch.zeros(2, 2, 10, 10, dtype=torch.bool)
    masks[:, 0, 0:10, 0:5] = True
    masks[:, 1, 0:10, 4:10] = True  # IoU 10 / 100 = 0.1: not above the threshold
    assert torch.allclose(pairwise_mask_iou(masks)[0, 0, 1], torch.tensor(0.1))
    positives = torch.rand(2, 2, 2, 2)
    points, labels, overlap = calibrated_prompts(positives, masks, torch.tensor([2, 2]), iou_threshold=0.1)
    assert not overlap.any()
    assert torch.equal(points, positives) and bool((labels == 1).all())


def test_point_features_sample_the_cell_under_the_point():
    features = torch.arange(4 * 4, dtype=torch.float32).view(1, 1, 4, 4).repeat(1, 2, 1, 1)  # B x C x 4 x 4
    points = torch.tensor([[[8.0, 8.0], [56.0, 24.0]]])  # centres of cells (0, 0) and (row 1, col 3)
    sampled = sample_point_features(features, points, image_size=64)
    assert torch.allclose(sampled[0, :, 0], torch.tensor([0.0, 7.0]))


# --------------------------------------------------------------- prototypes and matching


def test_store_is_fifo_and_clusters_every_period():
    state = PointSamState(dim=4, store_size=5, cluster_every=3, num_target_images=1)
    first, second = torch.arange(12.0).view(3, 4), torch.arange(100.0, 116.0).view(4, 4)
    state.push(first)
    state.push(second)
    assert torch.equal(state.store, torch.cat([first[2:], second]))  # newest 5, oldest first
    clustered = [state.step_done() for _ in range(7)]
    assert clustered == [False, False, True, False, False, True, False]
    assert state.iteration == 7 and state.prototypes.shape[0] >= 1
    assert torch.allclose(state.prototypes.norm(dim=1), torch.ones(state.prototypes.shape[0]))


def test_finch_prototypes_find_separated_groups():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5.0
    features = torch.cat([centres[i] + 0.05 * torch.randn(6, 8, generator=generator) for i in range(3)])
    prototypes = cluster_prototypes(features)
    # every prototype lies close to one of the three group directions, and each group is represented
    closeness = prototypes @ torch.eye(8)[:3].T  # P x 3
    assert bool((closeness.max(dim=1).values > 0.95).all())
    assert set(closeness.argmax(dim=1).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="N >= 3"):
        cluster_prototypes(features[:2])


def test_hungarian_matching_pairs_and_leftovers():
    targets = torch.eye(4)[:3]  # 3 x 4
    prototypes = torch.stack([targets[2] + 0.1 * targets[0], targets[0], torch.eye(4)[3], targets[1]])  # 4 x 4
    matched = match_prototypes(prototypes, targets)
    assert matched.tolist() == [2, 0, -1, 1]  # the prototype far from every target stays unmatched
    # more targets than prototypes: each prototype gets its own best target, a target at most once
    assert match_prototypes(targets[[1, 1]] + torch.tensor([[0.0, 0, 0.3, 0], [0.0, 0, 0, 0]]), targets).tolist() \
        == [2, 1]


def test_prototype_loss_is_one_minus_cosine_over_matched_pairs():
    targets = torch.eye(3)
    prototypes = torch.eye(3)
    matched = torch.tensor([1, -1, 0])  # prototype 0 -> target 1, prototype 2 -> target 0
    features = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)  # join prototypes 0 and 2
    loss = prototype_loss(features, prototypes, matched, targets)
    cos_0 = torch.nn.functional.cosine_similarity(features[0], targets[1], dim=0)
    cos_2 = torch.nn.functional.cosine_similarity(features[1], targets[0], dim=0)
    assert torch.allclose(loss, 1 - (cos_0 + cos_2) / 2)
    loss.backward()
    assert features.grad.abs().sum() > 0
    empty = prototype_loss(features, torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), targets)
    assert empty.item() == 0.0 and empty.requires_grad


def test_target_prototypes_come_from_the_first_images():
    state = PointSamState(dim=4, store_size=8, cluster_every=1, num_target_images=3)
    generator = torch.Generator().manual_seed(1)
    state.collect_targets(torch.randn(4, 4, generator=generator), num_images=2)
    assert not state.targets_ready and state.target_buffer.shape[0] == 4
    state.collect_targets(torch.randn(3, 4, generator=generator), num_images=1)
    assert state.targets_ready and state.target_buffer.shape[0] == 0
    frozen = state.target_prototypes.clone()
    state.collect_targets(torch.randn(5, 4, generator=generator), num_images=4)
    assert torch.equal(state.target_prototypes, frozen) and state.target_images_seen == 3


def test_state_dict_round_trip():
    state = PointSamState(dim=4, store_size=6, cluster_every=2, num_target_images=1)
    generator = torch.Generator().manual_seed(2)
    state.collect_targets(torch.randn(5, 4, generator=generator), num_images=1)
    for _ in range(3):
        state.push(torch.randn(3, 4, generator=generator))
        state.step_done()
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = PointSamState(dim=4, store_size=6, cluster_every=2, num_target_images=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key in ("store", "prototypes", "matched", "target_prototypes", "target_buffer"):
        assert torch.equal(getattr(restored, key), getattr(state, key)), key
    assert (restored.iteration, restored.target_images_seen) == (3, 1)
    assert restored.prototypes.shape[0] > 0 and restored.matched.shape[0] == restored.prototypes.shape[0]
    with pytest.raises(ValueError, match="channels"):
        PointSamState(dim=8, store_size=6).load_state_dict(state.state_dict())


# ------------------------------------------------------------------------ the step


def test_teacher_branch_keeps_its_graph_and_trains_lora():
    model = _tiny_lora_model()
    batch = _batch(num_instances=2)
    cfg = _pointsam_config()
    dim = model.embed_dim
    state = PointSamState.from_config(cfg, dim)
    # prototypes and targets in place, so the prototype loss (on teacher features) is active
    state.prototypes = torch.nn.functional.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(3)),
                                                     dim=1)
    state.target_prototypes = -state.prototypes
    state.matched = torch.tensor([0, 1])

    encoder_outputs = []

    def cut_student_graph(module, inputs, output):  # call 1 = teacher (weak), call 2 = student (strong)
        encoder_outputs.append(output)
        return output.detach() if len(encoder_outputs) == 2 else output

    handle = model.image_encoder.register_forward_hook(cut_student_graph)
    try:
        result = pointsam_step(model, batch, state, cfg)
    finally:
        handle.remove()
    teacher_features = encoder_outputs[0]
    assert teacher_features.requires_grad and teacher_features.grad_fn is not None
    assert all(t.grad_fn is not None for t in state.teacher_outputs[:2])  # teacher decoder graph held
    assert result.parts["proto"].item() > 0
    # with the student's encoder cut off, gradient reaches LoRA only through the teacher branch
    result.loss.backward()
    grads = [p.grad for p in _lora_parameters(model).values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_few_steps_train_lora_with_finite_losses():
    torch.manual_seed(0)
    model = _tiny_lora_model()
    batches = [_batch(num_images=1, num_instances=3, seed=seed) for seed in (0, 1)]
    cfg = _pointsam_config(pointsam_cluster_every=1, pointsam_target_images=1, pointsam_store_size=16)
    state = PointSamState.from_config(cfg, model.embed_dim)
    lora = _lora_parameters(model)
    before = {name: p.detach().clone() for name, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)
    losses, protos = [], []
    for batch in batches:  # step 1 builds targets and prototypes, step 2 uses them
        store_before, iteration_before = state.store.clone(), state.iteration
        result = pointsam_step(model, batch, state, cfg)
        # the step itself leaves the store alone (a skipped step must not change it)
        assert torch.equal(state.store, store_before) and state.iteration == iteration_before
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(result.loss.item())
        protos.append(result.parts["proto"].item())
        assert result.weak_embeddings.shape == (3, model.embed_dim)  # 3 instances x 1 point
        state.commit(result.weak_embeddings, num_images=1)
    assert all(np.isfinite(losses)) and all(np.isfinite(protos))
    assert state.iteration == 2 and state.targets_ready and state.store.shape[0] == 6
    assert protos[0] == 0.0 and protos[1] > 0.0
    assert any(not torch.equal(before[name], p.detach()) for name, p in lora.items())
