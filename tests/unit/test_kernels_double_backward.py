"""Backwards built with create_graph=True (second derivatives, gradient penalties): the fused
kernels' gradients have no autograd graph, so each fused backward refuses by name instead of
silently dropping the second-order terms; the reference path (use_triton=False) computes them.
The SSA loss computes them through its reference: tests/unit/test_kernels_ssa.py."""

import pytest
import torch

import resam_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE).requires_grad_(True)


def mask_loss_case(use_triton):
    logits = randn(2, 5, 6, seed=0)
    target = (torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(1)) < 0.5).to(DEVICE)
    focal, dice, _ = resam_kernels.mask_loss_terms(logits, target, use_triton=use_triton)
    return (focal + dice).sum(), [logits]


def upsampled_mask_loss_case(use_triton):
    low_res = randn(2, 3, 4, seed=2)
    target = (torch.rand(2, 12, 16, generator=torch.Generator().manual_seed(3)) < 0.5).to(DEVICE)
    focal, dice, _ = resam_kernels.upsampled_mask_loss_terms(low_res, target, use_triton=use_triton)
    return (focal + dice).sum(), [low_res]


def upsample_case(use_triton):
    low_res = randn(1, 1, 3, 3, seed=4)
    return resam_kernels.upsample4x(low_res, use_triton=use_triton).pow(2).sum(), [low_res]


def relpos_case(use_triton):
    height, width, dim = 3, 4, 16
    q, k, v = (randn(1, 1, height * width, dim, seed=5 + i) for i in range(3))
    rel_h, rel_w = randn(1, 1, height * width, height, seed=8), randn(1, 1, height * width, width, seed=9)
    out = resam_kernels.relpos_attention(q, k, v, rel_h, rel_w, width, 0.3, use_triton=use_triton)
    return out.pow(2).sum(), [q, k]


def layer_norm_case(use_triton):
    x, weight, bias = randn(7, 33, seed=10), randn(33, seed=11), randn(33, seed=12)
    out = resam_kernels.layer_norm(x, weight, bias, 1e-6, use_triton=use_triton)
    return out.pow(2).sum(), [x, weight]


def mask_head_case(use_triton):
    upscaled, weight = randn(2, 8, 3, 3, seed=13), randn(8, 4, 2, 2, seed=14, scale=0.3)
    bias, hyper_in = randn(4, seed=15), randn(2, 4, seed=16)
    masks = resam_kernels.mask_head(upscaled, weight, bias, hyper_in, use_triton=use_triton)
    return masks.pow(2).sum(), [upscaled, hyper_in]


CASES = {"mask_loss_terms": mask_loss_case, "upsampled_mask_loss_terms": upsampled_mask_loss_case,
         "upsample4x": upsample_case, "relpos_attention": relpos_case, "layer_norm": layer_norm_case,
         "mask_head": mask_head_case}


@pytest.mark.parametrize("name", CASES)
def test_fused_backward_refuses_create_graph_by_name(name):
    loss, inputs = CASES[name](use_triton=True)
    with pytest.raises(RuntimeError, match=f"resam_kernels.{name}: the fused Triton backward is first-order only"):
        torch.autograd.grad(loss, inputs, create_graph=True)
    # a plain backward works, and the reference path gives second derivatives (a gradient penalty)
    loss, inputs = CASES[name](use_triton=True)
    assert all(grad is not None for grad in torch.autograd.grad(loss, inputs))
    loss, inputs = CASES[name](use_triton=False)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum(grad.pow(2).sum() for grad in grads)
    second = torch.autograd.grad(penalty, inputs[0])[0]
    assert second.isfinite().all() and second.abs().max() > 0
