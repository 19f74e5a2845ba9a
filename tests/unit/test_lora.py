"""LoRA through peft on the tiny SAM: trainable set, gradients, adapter files, merging."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from resam_dist.model.build import build_sam
from resam_dist.model.lora import (
    CONFIG_FILE, PEFT_KEY_PREFIX, WEIGHTS_FILE, apply_lora, has_lora, load_adapter, lora_state_dict, merge_lora,
    save_adapter)

SIZE = 256
EMBED_DIM = 160  # tiny encoder width
DEPTH = 6  # tiny encoder blocks


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    points = torch.rand(2, 3, 2, 2, generator=generator) * SIZE  # B x K x P x 2
    labels = torch.tensor([1, 0]).expand(2, 3, 2)  # B x K x P
    counts = torch.tensor([3, 2])
    return images, counts, points, labels


def lora_model(*, start_block: int = 1, rank: int = 4, dropout: float = 0.0, randomise_b: bool = True):
    model = apply_lora(build_sam("tiny", seed=0), rank=rank, alpha=8.0, dropout=dropout,
                       start_block=start_block, seed=1)
    if randomise_b:  # peft starts B at zero; give the adapters an effect
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("start_block", [0, 1, 3])
def test_only_lora_of_blocks_from_start_block_train(start_block):
    rank = 4
    model = lora_model(start_block=start_block, rank=rank, randomise_b=False)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    # per adapted block: A is rank x D, B is 3D x rank
    assert sum(trainable.values()) == (DEPTH - start_block) * (rank * EMBED_DIM + 3 * EMBED_DIM * rank)
    expected_names = {f"image_encoder.blocks.{i}.attn.qkv.{part}.default.weight"
                      for i in range(start_block, DEPTH) for part in ("lora_A", "lora_B")}
    assert set(trainable) == expected_names
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(frozen) > 0 and sum(p.numel() for p in frozen) > 2_500_000
    assert set(lora_state_dict(model)) == {name.replace(".default.", ".") for name in expected_names}


def test_invalid_lora_arguments():
    with pytest.raises(ValueError, match=r"start_block must lie in \[0, 5\]"):
        apply_lora(build_sam("tiny", seed=0), rank=4, alpha=4.0, dropout=0.0, start_block=6)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(build_sam("tiny", seed=0), rank=0, alpha=4.0, dropout=0.0, start_block=0)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lora_model(randomise_b=False), rank=4, alpha=4.0, dropout=0.0, start_block=0)


def test_fresh_lora_leaves_output_unchanged_and_gradient_reaches_lora_only():
    base = build_sam("tiny", seed=0).eval()
    model = lora_model(randomise_b=False)
    images, counts, points, labels = inputs()
    with torch.no_grad():
        assert torch.equal(model(images, counts, points, labels)[0], base(images, counts, points, labels)[0])

    model = lora_model()
    logits, iou, features = model(images, counts, points, labels)
    (logits[0, :3].sigmoid().mean() + iou[1, :2].sum() + features.square().mean()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_adapter_save_load_round_trip_is_exact(tmp_path):
    model = lora_model(dropout=0.1)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / CONFIG_FILE).is_file() and (tmp_path / "adapter" / WEIGHTS_FILE).is_file()
    saved_config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert (saved_config["r"], saved_config["lora_alpha"], saved_config["lora_dropout"]) == (4, 8.0, 0.1)

    fresh = build_sam("tiny", seed=0)
    assert not has_lora(fresh)
    loaded = load_adapter(fresh, tmp_path / "adapter").eval()
    assert loaded is fresh and has_lora(loaded)
    expected, actual = lora_state_dict(model), lora_state_dict(loaded)
    assert set(expected) == set(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    images, counts, points, labels = inputs(1)
    with torch.no_grad():
        reference = model(images, counts, points, labels)
        result = loaded(images, counts, points, labels)
    assert all(torch.equal(a, b) for a, b in zip(reference, result))

    # into a model that already has matching adapters (e.g. resuming)
    other = lora_model(dropout=0.1, randomise_b=False)
    load_adapter(other, tmp_path / "adapter")
    assert all(torch.equal(lora_state_dict(other)[k], expected[k]) for k in expected)


def test_the_adapter_is_peft_s_layout_and_loads_both_ways(tmp_path):
    """PeftModel.from_pretrained on a fresh SAM gives the LoRA model (no missing-key warning), and an
    adapter written by peft, or by save_adapter before it took peft's key layout, loads back."""
    import warnings

    from peft import PeftModel

    model = lora_model()
    save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft only warns about adapter keys it cannot place
        wrapped = PeftModel.from_pretrained(build_sam("tiny", seed=0), str(tmp_path / "adapter")).eval()
    images, counts, points, labels = inputs(3)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images, counts, points, labels),
                                                       wrapped.base_model.model(images, counts, points, labels)))
    wrapped.save_pretrained(str(tmp_path / "by_peft"))
    unprefixed = tmp_path / "unprefixed"
    save_adapter(model, unprefixed)
    tensors = load_file(str(unprefixed / WEIGHTS_FILE))
    save_file({key.removeprefix(PEFT_KEY_PREFIX): tensor for key, tensor in tensors.items()},
              str(unprefixed / WEIGHTS_FILE))
    for folder in ("by_peft", "unprefixed"):
        loaded = load_adapter(build_sam("tiny", seed=0), tmp_path / folder)
        assert all(torch.equal(loaded_tensor, lora_state_dict(model)[key])
                   for key, loaded_tensor in lora_state_dict(loaded).items()), folder


def test_adapter_save_is_atomic(tmp_path, monkeypatch):
    import resam_dist.model.lora as lora_module

    adapter = tmp_path / "export" / "adapter"
    first, second = lora_model(), lora_model()
    with torch.no_grad():
        for name, parameter in second.named_parameters():
            if ".lora_B." in name:
                parameter.add_(1.0)
    key = next(name for name in lora_state_dict(first) if ".lora_B." in name)
    assert not torch.equal(lora_state_dict(first)[key], lora_state_dict(second)[key])
    save_adapter(first, adapter)
    # a writer killed between the two files leaves the earlier adapter whole

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the weights")
    monkeypatch.setattr(lora_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, adapter)
    assert sorted(p.name for p in adapter.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert torch.equal(load_file(str(adapter / WEIGHTS_FILE))[PEFT_KEY_PREFIX + key], lora_state_dict(first)[key])
    # ... and none where there was none
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, tmp_path / "other" / "adapter")
    assert not (tmp_path / "other" / "adapter").exists()
    monkeypatch.undo()
    # a later save replaces the adapter and clears the leftovers (a writer killed between its two
    # renames would have left adapter.old)
    (tmp_path / "export" / "adapter.old").mkdir()
    save_adapter(second, adapter)
    assert torch.equal(load_file(str(adapter / WEIGHTS_FILE))[PEFT_KEY_PREFIX + key], lora_state_dict(second)[key])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["adapter"]


def test_adapter_errors(tmp_path):
    model = lora_model()
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(build_sam("tiny", seed=0), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not match the model's adapters"):
        load_adapter(lora_model(rank=2, randomise_b=False), tmp_path / "adapter")

    tensors = load_file(str(tmp_path / "adapter" / WEIGHTS_FILE))
    tensors["image_encoder.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, EMBED_DIM)
    save_file(tensors, str(tmp_path / "adapter" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors do not match.*unexpected "
                                         r"\['image_encoder\.blocks\.0\.attn\.qkv\.lora_A\.weight'\]"):
        load_adapter(build_sam("tiny", seed=0), tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    config["target_modules"] = ["image_encoder.blocks.9.attn.qkv"]
    (tmp_path / "adapter" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config\.json targets modules this 6-block model lacks"):
        load_adapter(build_sam("tiny", seed=0), tmp_path / "adapter")


def test_merged_model_matches_lora_model(tmp_path):
    model = lora_model()
    merged = merge_lora(model)
    assert not has_lora(merged) and has_lora(model)  # the original keeps its adapters
    assert set(merged.state_dict()) == set(build_sam("tiny", seed=0).state_dict())
    images, counts, points, labels = inputs(2)
    with torch.no_grad():
        reference = model(images, counts, points, labels)
        result = merged(images, counts, points, labels)
        base = build_sam("tiny", seed=0).eval()(images, counts, points, labels)
    for expected, actual in zip(reference, result):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base[2], reference[2], atol=1e-3)  # the adapters do change the features

    torch.save(merged.state_dict(), tmp_path / "merged.pth")  # exported in the official layout
    reloaded = build_sam("tiny", tmp_path / "merged.pth")
    with torch.no_grad():
        assert torch.equal(reloaded(images, counts, points, labels)[0], result[0])


def test_dropout_only_in_train_mode():
    model = lora_model(dropout=0.5)
    images, counts, points, labels = inputs(3)
    with torch.no_grad():
        model.eval()
        first = model.encode(images[:1])
        second = model.encode(images[:1])
        model.train()
        noisy = model.encode(images[:1])
    assert torch.equal(first, second)
    assert not torch.allclose(first, noisy)


def test_lora_layers_run_through_module_forward():
    """ZeRO-3 fetches a module's parameters in its forward: the LoRA A/B Linears must be called."""
    model = lora_model()
    called = set()
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
               for name, module in model.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    images, counts, points, labels = inputs(4)
    with torch.no_grad():
        model(images[:1], counts[:1], points[:1], labels[:1])
    for handle in handles:
        handle.remove()
    assert len(handles) == 2 * (DEPTH - 1) and len(called) == 2 * (DEPTH - 1)


def test_seeded_build_and_lora_leave_every_global_generator_alone(monkeypatch):
    # torch.manual_seed would reseed every CUDA device too (lazily, on CPU machines), which fork_rng
    # does not restore: a trainer's per-rank CUDA seed would become the model's seed on all ranks
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    reseeded.clear()
    a = lora_model(randomise_b=False)
    b = lora_model(randomise_b=False)
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
