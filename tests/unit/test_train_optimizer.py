"""The trainer's optimizer at ZeRO stage 0 in fp32 (`FiniteStepAdamW`): it clips as DeepSpeed does,
and skips an update whose gradients or whose total norm are not finite, where DeepSpeed's own
clipping, applied before, would have turned finite gradients of an overflowing norm into zeros
that were then stepped. Against torch's AdamW after torch's clip_grad_norm_, and inside a real
DeepSpeed engine on a one-rank gloo world."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from resam_dist.config import load_config
from resam_dist.train.engine import FiniteStepAdamW, build_optimizer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.json"


def two_tensors(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
            torch.nn.Parameter(torch.randn(7, generator=generator))]


def set_grads(params, grads) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()


@pytest.mark.parametrize("clip, scale", [(1.0, 10.0), (1.0, 0.01), (0.0, 10.0)])
def test_an_update_equals_adamw_after_torch_clipping(clip, scale):
    params, reference = two_tensors(), two_tensors()
    optimizer = FiniteStepAdamW(params, clip_grad=clip, lr=1e-2, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [scale * torch.randn(param.shape, generator=generator) for param in params]
        set_grads(params, grads)
        set_grads(reference, grads)
        norm = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in grads]))
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(reference, clip)
        optimizer.step()
        reference_optimizer.step()
        assert not optimizer.overflow
        assert float(optimizer._global_grad_norm) == pytest.approx(float(norm), rel=1e-6)
        for param, expected in zip(params, reference, strict=True):
            torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", ["nan", "inf", "norm_overflow"])
def test_an_update_of_non_finite_gradients_or_norm_is_skipped(bad):
    params = two_tensors()
    optimizer = FiniteStepAdamW(params, clip_grad=1.0, lr=1e-2, weight_decay=0.1)
    set_grads(params, [torch.ones(5, 3), torch.ones(7)])
    optimizer.step()  # (moments to keep)
    before = copy.deepcopy([param.detach() for param in params]), copy.deepcopy(optimizer.state_dict())
    grads = [torch.ones(5, 3), torch.ones(7)]
    if bad == "norm_overflow":  # every element finite, and each tensor's norm; their total overflows fp32
        grads[0][2, 1], grads[1][4] = 1.5e19, 1.5e19
        assert all(bool(torch.isfinite(torch.linalg.vector_norm(grad))) for grad in grads)
    else:
        grads[1][3] = float(bad)
    set_grads(params, grads)
    optimizer.step()
    assert optimizer.overflow
    assert all(torch.equal(param, old) for param, old in zip(params, before[0], strict=True))
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][key], before[1]["state"][i][key]) for i in state for key in state[i])
    set_grads(params, [torch.ones(5, 3), torch.ones(7)])
    optimizer.step()  # the next finite update is applied
    assert not optimizer.overflow and not torch.equal(params[0], before[0][0])


def test_the_trainer_hands_clipping_to_deepspeed_except_at_stage_0_in_fp32():
    cfg = load_config(CONFIG)
    for stage, bf16, kind, deepspeed_clip in ((0, False, FiniteStepAdamW, 0.0), (0, True, torch.optim.AdamW, 1.0),
                                              (2, False, torch.optim.AdamW, 1.0)):
        optimizer, clipping = build_optimizer(two_tensors(), cfg, zero_stage=stage, bf16=bf16)
        assert type(optimizer) is kind and clipping == deepspeed_clip * cfg.train.grad_clip
        assert optimizer.defaults["lr"] == cfg.train.lr and optimizer.defaults["weight_decay"] == cfg.train.weight_decay
    assert build_optimizer(two_tensors(), cfg, zero_stage=0, bf16=False)[0].clip_grad == cfg.train.grad_clip


def test_a_stage_0_engine_skips_an_overflowing_norm_and_clips_the_others(one_rank_world):
    """A real DeepSpeed engine at stage 0 in fp32: finite gradients whose total norm overflows
    leave the weights alone (with DeepSpeed's clipping on, they were clipped to zeros and stepped);
    ordinary ones are clipped once, to train.grad_clip. Two applied steps of different gradient
    scales (AdamW's first step alone hardly depends on the scale)."""
    import deepspeed

    from resam_dist.train.engine import _disable_deepspeed_shm_build
    one_rank_world(30)
    _disable_deepspeed_shm_build()
    cfg = load_config(CONFIG)
    model = torch.nn.Linear(6, 2)
    reference = copy.deepcopy(model)
    optimizer, clipping = build_optimizer(list(model.parameters()), cfg, zero_stage=0, bf16=False)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "zero_optimization": {"stage": 0}, "gradient_clipping": clipping, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    inputs = torch.ones(1, 6, device=engine.device)

    def weights(module):
        return [param.detach().cpu() for param in module.parameters()]

    engine.backward(engine(inputs).sum() * 1e19)  # weight grads 1e19 each: the total norm overflows fp32
    engine.step()
    assert not engine.was_step_applied()
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(reference), strict=True))

    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.train.lr,
                                            weight_decay=cfg.train.weight_decay)
    for scale in (100.0, 3.0):  # gradient norms scale x sqrt(14): 374 and 11, both clipped to grad_clip
        engine.backward(engine(inputs).sum() * scale)
        engine.step()
        assert engine.was_step_applied()
        assert float(optimizer._global_grad_norm) == pytest.approx(scale * 14**0.5, rel=1e-6)
        (reference(inputs.cpu()).sum() * scale).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.grad_clip)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    for param, expected in zip(weights(model), weights(reference), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
