"""SAM registry, official checkpoint loading and batched prompting against SAM's own decoder."""

import pytest
import torch
from torch.nn import functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from resam_dist.model.build import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD, SAM_REGISTRY, build_sam
from resam_dist.model.sam import BatchedMaskDecoder, PromptableSam

SIZE = IMAGE_SIZE["tiny"]


@pytest.fixture(scope="module")
def tiny() -> PromptableSam:
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def features(tiny) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        return tiny.encode(images)  # 3 x 128 x 16 x 16


def random_prompts(num_images: int, num_instances: int, num_points: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(num_images, num_instances, num_points, 2, generator=generator) * SIZE  # B x K x P x 2
    labels = torch.randint(0, 2, (num_images, num_instances, num_points), generator=generator)  # B x K x P
    corner = torch.rand(num_images, num_instances, 2, generator=generator) * (SIZE / 2)
    extent = torch.rand(num_images, num_instances, 2, generator=generator) * (SIZE / 2) + 1
    boxes = torch.cat([corner, corner + extent], dim=-1)  # B x K x 4
    return points, labels, boxes


def sam_reference(model: PromptableSam, features, counts, points, labels, boxes):
    """SAM's own per-image prompt encoder + mask decoder + upsampling, with the same weights."""
    spec = SAM_REGISTRY["tiny"]
    dim = spec.prompt_embed_dim
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(16, 16),
                                   input_image_size=(SIZE, SIZE), mask_in_chans=16)
    prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
        transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=dim,
                                      mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_num_heads))
    mask_decoder.load_state_dict(model.mask_decoder.state_dict())
    results = []
    for b in range(features.shape[0]):
        n = int(counts[b])
        if n == 0:
            results.append(None)
            continue
        # SAM adds half a pixel to its inputs; our coordinates already sit at pixel centres
        prompt_points = None if points is None else (points[b, :n] - 0.5, labels[b, :n])
        prompt_boxes = None if boxes is None else boxes[b, :n] - 0.5
        sparse, dense = prompt_encoder(points=prompt_points, boxes=prompt_boxes, masks=None)
        low_res, iou = mask_decoder(image_embeddings=features[b:b + 1], image_pe=prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        logits = F.interpolate(low_res, (SIZE, SIZE), mode="bilinear", align_corners=False)
        results.append((logits[:, 0], iou[:, 0]))
    return results


def test_constants():
    assert IMAGE_SIZE == {"tiny": 256, "vit_b": 1024, "vit_l": 1024, "vit_h": 1024}
    assert PIXEL_MEAN == (123.675, 116.28, 103.53) and PIXEL_STD == (58.395, 57.12, 57.375)
    with pytest.raises(ValueError, match="vit_x"):
        build_sam("vit_x")


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_variants_have_the_official_state_dict_layout(name):
    with torch.device("meta"):
        ours = build_sam(name).state_dict()
        official = sam_model_registry[name]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_tiny_architecture(tiny, features):
    num_params = sum(p.numel() for p in tiny.parameters())
    assert 2_500_000 < num_params < 4_000_000
    assert (tiny.image_size, tiny.feature_stride, tiny.embed_dim) == (256, 16, 128)
    blocks = tiny.image_encoder.blocks
    assert len(blocks) >= 4
    window_sizes = [block.window_size for block in blocks]
    assert 0 in window_sizes and any(w > 0 for w in window_sizes)  # windowed and global blocks
    assert features.shape == (3, 128, 16, 16)


def test_seed_makes_init_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_sam("tiny", seed=7).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = build_sam("tiny", seed=7).state_dict()
    other = build_sam("tiny", seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["image_encoder.patch_embed.proj.weight"],
                           other["image_encoder.patch_embed.proj.weight"])


def test_official_vit_b_checkpoint_loads_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(official.state_dict(), path)
    model = build_sam("vit_b", path)
    ours = model.state_dict()
    theirs = official.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not any(t.is_meta for t in model.parameters())

    # patch embedding + neck (the blocks cost seconds at 1024 px on a CPU; their weights are compared
    # above), then the prompt/mask decoders, against SAM's own modules
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 1024, 1024, generator=generator)
    with torch.no_grad():
        def partial_encode(encoder):
            x = encoder.patch_embed(image) + encoder.pos_embed  # 1 x 64 x 64 x 768
            return encoder.neck(x.permute(0, 3, 1, 2))  # 1 x 256 x 64 x 64
        feats = partial_encode(model.image_encoder)
        # the neck's LayerNorm2d runs as one F.layer_norm here (model.attention "sdpa"): equal up to rounding
        torch.testing.assert_close(feats, partial_encode(official.image_encoder), atol=1e-5, rtol=1e-5)
        points = torch.tensor([[[[100.5, 200.5], [700.5, 30.5]], [[512.5, 512.5], [0.5, 0.5]]]])  # 1 x 2 x 2 x 2
        labels = torch.tensor([[[1, 0], [1, 1]]])
        logits, iou = model.decode(feats, torch.tensor([2]), points, labels)
        sparse, dense = official.prompt_encoder(points=(points[0] - 0.5, labels[0]), boxes=None, masks=None)
        low_res, ref_iou = official.mask_decoder(feats, official.prompt_encoder.get_dense_pe(), sparse, dense,
                                                 multimask_output=False)
        ref_logits = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits[0], ref_logits[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou[0], ref_iou[:, 0], atol=1e-5, rtol=1e-5)


def test_checkpoint_errors_name_the_file_and_the_keys(tmp_path, tiny):
    state = tiny.state_dict()
    with pytest.raises(ValueError, match="does not exist"):
        build_sam("tiny", tmp_path / "nope.pth")

    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*1 missing keys: mask_decoder\.iou_token\.weight"):
        build_sam("tiny", tmp_path / "missing.pth")

    unexpected = dict(state, **{"image_encoder.extra": torch.zeros(1)})
    torch.save(unexpected, tmp_path / "unexpected.pth")
    with pytest.raises(ValueError, match=r"unexpected\.pth.*unexpected keys: image_encoder\.extra"):
        build_sam("tiny", tmp_path / "unexpected.pth")

    wrong_shape = dict(state, **{"image_encoder.pos_embed": torch.zeros(1, 8, 8, 64)})
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*image_encoder\.pos_embed: checkpoint \(1, 8, 8, 64\)"):
        build_sam("tiny", tmp_path / "shape.pth")

    with pytest.raises(ValueError, match=r"tiny\.pth does not match SAM 'vit_b'.*shape mismatches"):  # a tiny checkpoint is no ViT-B
        torch.save(state, tmp_path / "tiny.pth")
        build_sam("vit_b", tmp_path / "tiny.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth could not be read"):
        build_sam("tiny", tmp_path / "garbage.pth")

    torch.save({"model": state}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match=r"nested\.pth is not a flat state dict"):
        build_sam("tiny", tmp_path / "nested.pth")


def test_tiny_checkpoint_round_trip(tmp_path, tiny, features):
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    loaded = build_sam("tiny", tmp_path / "tiny.pth")
    points, labels, _ = random_prompts(3, 2, 1, seed=0)
    counts = torch.tensor([2, 1, 2])
    with torch.no_grad():
        assert torch.equal(loaded.encode(torch.ones(1, 3, SIZE, SIZE)), tiny.encode(torch.ones(1, 3, SIZE, SIZE)))
        assert torch.equal(loaded.decode(features, counts, points, labels)[0],
                           tiny.decode(features, counts, points, labels)[0])


@pytest.mark.parametrize("prompt_kind", ["points", "boxes", "both"])
def test_batched_decode_equals_sam_per_image(tiny, features, prompt_kind):
    points, labels, boxes = random_prompts(3, 5, 3, seed=2)
    points = points if prompt_kind in ("points", "both") else None
    labels = labels if prompt_kind in ("points", "both") else None
    boxes = boxes if prompt_kind in ("boxes", "both") else None
    counts = torch.tensor([3, 0, 5])
    with torch.no_grad():
        logits, iou = tiny.decode(features, counts, points, labels, boxes)
        reference = sam_reference(tiny, features, counts, points, labels, boxes)
    assert logits.shape == (3, 5, SIZE, SIZE) and logits.dtype == torch.float32
    assert iou.shape == (3, 5) and iou.dtype == torch.float32
    for b, expected in enumerate(reference):
        n = int(counts[b])
        if expected is not None:
            torch.testing.assert_close(logits[b, :n], expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[b, :n], expected[1], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(logits[b, n:]) == 0 and torch.count_nonzero(iou[b, n:]) == 0
    assert all(torch.count_nonzero(logits[0, k]) > 0 for k in range(3))  # valid instances were really computed


def test_chunking_gives_the_same_result(tiny, features):
    points, labels, _ = random_prompts(3, 7, 2, seed=3)
    counts = torch.tensor([7, 2, 5])
    with torch.no_grad():
        whole, whole_iou = tiny.decode(features, counts, points, labels, max_instances=50)
        chunked, chunked_iou = tiny.decode(features, counts, points, labels, max_instances=3)
        single, single_iou = tiny.decode(features, counts, points, labels, max_instances=1, min_chunks=9)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked_iou, whole_iou, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single_iou, whole_iou, atol=1e-6, rtol=1e-6)


def test_decode_without_padding_matches_sam_and_the_scatter_path(tiny, features):
    """All counts == K takes the no-scatter path (outputs already in B x K order): the same values
    as SAM per image, the same decoder calls (empty ones of min_chunks included), and the same
    gradients as the scatter path (taken here through decoder checkpointing)."""
    points, labels, boxes = random_prompts(3, 7, 2, seed=6)
    counts = torch.tensor([7, 7, 7])
    calls = []
    handle = tiny.mask_decoder.register_forward_pre_hook(lambda module, args: calls.append(args[1].numel()))
    try:
        with torch.no_grad():
            logits, iou = tiny.decode(features, counts, points, labels, boxes, max_instances=3, min_chunks=4)
    finally:
        handle.remove()
    assert calls == [9, 9, 3, 0]
    assert logits.shape == (3, 7, SIZE, SIZE) and iou.shape == (3, 7)
    for b, expected in enumerate(sam_reference(tiny, features, counts, points, labels, boxes)):
        torch.testing.assert_close(logits[b], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iou[b], expected[1], atol=1e-5, rtol=1e-5)

    def gradients():
        tiny.zero_grad()
        out, out_iou = tiny.decode(features, counts, points, labels, boxes, max_instances=3)
        (out.sigmoid().mean() + out_iou.square().mean()).backward()
        return {name: p.grad.clone() for name, p in tiny.mask_decoder.named_parameters() if p.grad is not None}

    direct = gradients()
    tiny.set_activation_checkpointing("decoder", prompts_per_group=4)
    try:
        scattered = gradients()
    finally:
        tiny.set_activation_checkpointing("off")
        tiny.zero_grad()
    assert direct.keys() == scattered.keys() and len(direct) > 5
    for name in direct:
        torch.testing.assert_close(direct[name], scattered[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("counts,checkpointed", [((5, 5), False), ((5, 2), False), ((5, 2), True)])
def test_decode_low_res_is_what_gets_upsampled(tiny, features, counts, checkpointed):
    """upsample=False returns the decoder's B x K x S/4 x S/4 logits: upsampled 4x bilinearly they
    are the default S x S output, on the no-padding path, the scatter path (padding: zeros) and
    with decoder checkpointing; the gradient reaches the decoder either way."""
    points, labels, boxes = random_prompts(2, 5, 1, seed=9)
    counts = torch.tensor(counts)
    tiny.set_activation_checkpointing("decoder" if checkpointed else "off", prompts_per_group=3)
    try:
        full, iou_full = tiny.decode(features[:2], counts, points, labels, max_instances=4)
        low, iou_low = tiny.decode(features[:2], counts, points, labels, max_instances=4, upsample=False)
    finally:
        tiny.set_activation_checkpointing("off")
    assert low.shape == (2, 5, SIZE // 4, SIZE // 4) and low.dtype == torch.float32
    upsampled = F.interpolate(low.reshape(10, 1, SIZE // 4, SIZE // 4), size=(SIZE, SIZE), mode="bilinear",
                              align_corners=False).reshape(2, 5, SIZE, SIZE)
    torch.testing.assert_close(upsampled, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou_low, iou_full)
    assert not low[1, counts[1]:].any() and low[1, :counts[1]].abs().sum() > 0  # padding instances stay zero
    tiny.zero_grad()
    low.square().mean().backward()
    assert tiny.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    tiny.zero_grad()


@pytest.mark.parametrize("num_images", [0, 3])
def test_decode_of_zero_instances_without_calls(tiny, features, num_images):
    """K = 0 with min_chunks = 0: no decoder call, empty B x 0 results (every count equals K, the
    no-padding case, which has no chunk outputs to concatenate here)."""
    points, labels, _ = random_prompts(num_images, 0, 2, seed=9)
    calls = []
    handle = tiny.mask_decoder.register_forward_pre_hook(lambda module, args: calls.append(args[1].numel()))
    try:
        with torch.no_grad():
            logits, iou = tiny.decode(features[:num_images], torch.zeros(num_images, dtype=torch.int64), points,
                                      labels, min_chunks=0)
    finally:
        handle.remove()
    assert calls == []
    assert logits.shape == (num_images, 0, SIZE, SIZE) and logits.dtype == torch.float32
    assert iou.shape == (num_images, 0) and iou.dtype == torch.float32


def test_decoder_calls_per_chunk_including_empty_ones(tiny, features):
    calls = []
    handle = tiny.mask_decoder.register_forward_pre_hook(lambda module, args: calls.append(args[1].numel()))
    try:
        points, labels, _ = random_prompts(3, 4, 1, seed=4)
        with torch.no_grad():
            tiny.decode(features, torch.tensor([4, 1, 0]), points, labels, max_instances=2)
            tiny.decode(features, torch.tensor([0, 0, 0]), points, labels, max_instances=2, min_chunks=3)
    finally:
        handle.remove()
    assert calls == [3, 2, 0, 0, 0]  # prompts per call: chunk [0, 2) of all images, then [2, 4); then empties


def test_forward_with_and_without_grad(tiny):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    points, labels, boxes = random_prompts(2, 3, 1, seed=5)
    counts = torch.tensor([3, 1])
    with torch.no_grad():
        teacher_logits, teacher_iou, teacher_features = tiny(images, counts, points, labels)
    assert not teacher_logits.requires_grad
    logits, iou, feats = tiny(images, counts, points, labels)
    assert feats.shape == (2, 128, 16, 16)
    torch.testing.assert_close(logits, teacher_logits)
    (logits[0, 0].sigmoid().mean() + iou[1, 0] + feats.mean()).backward()
    patch_grad = tiny.image_encoder.patch_embed.proj.weight.grad
    decoder_grad = tiny.mask_decoder.iou_prediction_head.layers[0].weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0
    assert decoder_grad is not None and decoder_grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_bf16_model_runs(tiny):
    model = build_sam("tiny", seed=0).to(torch.bfloat16)
    images = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    points, labels, boxes = random_prompts(1, 2, 1, seed=6)
    with torch.no_grad():
        logits, iou, feats = model(images, torch.tensor([2]), points, labels, boxes)  # float32 images are cast
        reference, _, _ = tiny(images, torch.tensor([2]), points, labels, boxes)
    assert feats.dtype == torch.bfloat16 and logits.dtype == torch.float32 and iou.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    # bf16 logits agree in sign with float32 on most pixels
    assert ((logits > 0) == (reference > 0)).float().mean() > 0.9


def test_every_parameter_is_used_inside_an_owning_forward(tiny, features):
    """ZeRO-3 contract: a parameter is fetched when the forward of its owner (or of a leaf module
    above it) starts; every owner of a used parameter must therefore have its forward called."""
    leaves = tiny.leaf_modules()
    assert leaves == [tiny.prompt_encoder, tiny.mask_decoder]
    assert isinstance(tiny.mask_decoder, BatchedMaskDecoder)
    leaf_names = [name for name, module in tiny.named_modules() if any(module is leaf for leaf in leaves)]
    called = set()
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
               for name, module in tiny.named_modules()]
    try:
        points, labels, boxes = random_prompts(1, 2, 1, seed=7)
        with torch.no_grad():
            tiny(torch.zeros(1, 3, SIZE, SIZE), torch.tensor([2]), points, labels, boxes)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in tiny.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        leaf = next((leaf for leaf in leaf_names if name == leaf or name.startswith(leaf + ".")), None)
        assert (leaf if leaf is not None else name) in called, name


def test_input_errors(tiny, features):
    points, labels, boxes = random_prompts(3, 2, 1, seed=8)
    with pytest.raises(ValueError, match="images must be B x 3 x 256 x 256"):
        tiny.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="counts must lie in"):
        tiny.decode(features, torch.tensor([3, 0, 0]), points, labels)
    with pytest.raises(ValueError, match="together"):
        tiny.decode(features, torch.tensor([1, 0, 0]), points)
    with pytest.raises(ValueError, match=r"points \(with point_labels\), boxes, or both"):
        tiny.decode(features, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="boxes give K=1"):
        tiny.decode(features, torch.tensor([1, 0, 0]), points, labels, boxes[:, :1])
