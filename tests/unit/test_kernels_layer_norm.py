"""Fused LayerNorm (residual, pre-bias, GELU): the Triton kernels against autograd of the torch reference.

Under TRITON_INTERPRET=1 the kernels use their GPU tiles (forward BLOCK_ROWS = 8192 / C_PAD rows a
program, backward 2048 / C_PAD rows a step, both at most 256) and two backward steps a program:
with C = 256 (8 rows a step) 130 rows are 9 programs, the last one with a partial first step and
an empty second one; C = 100 runs 128 padded columns; C = 1 has 256 rows a tile (zero variance:
y = bias).
"""

import pytest
import torch

import resam_kernels
from resam_kernels.layer_norm import MAX_C, layer_norm_reference, layer_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def make_inputs(rows, channels, dtype, *, residual, pre_bias, param_dtype=None, seed=0):
    """x (rows x C, mean and scale varying per row), residual, pre_bias, weight, bias (or None)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    param_dtype = param_dtype or dtype
    x = randn(rows, channels) * (randn(rows, 1).abs() * 3 + 0.1) + randn(rows, 1) * 2
    tensors = {
        "x": x,
        "residual": randn(rows, channels) if residual else None,
        "pre_bias": randn(channels) * 0.5 if pre_bias else None,
        "weight": (randn(channels) * 0.3 + 1).to(param_dtype),
        "bias": (randn(channels) * 0.3).to(param_dtype),
    }
    for name in ("x", "residual", "pre_bias"):
        if tensors[name] is not None:
            tensors[name] = tensors[name].to(dtype)
    return {name: None if t is None else t.to(DEVICE) for name, t in tensors.items()}


def output_and_gradients(fn, inputs, gelu, seed=1):
    """y, the gradients of sum(y * upstream) wrt every given tensor (dict name -> grad), upstream."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items() if t is not None}
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], EPS, residual=leaves.get("residual"),
           pre_bias=leaves.get("pre_bias"), gelu=gelu)
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(y.shape, generator=generator).to(y.dtype).to(DEVICE)
    grads = torch.autograd.grad(y, list(leaves.values()), upstream, allow_unused=True)
    return y, {name: grad for name, grad in zip(leaves, grads)}, upstream


def assert_within(got, expected, scale, tol, name):
    """|got - expected| <= tol (scale + |expected|) elementwise (scale broadcast to the shape)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    error = (got.double() - expected.double()).abs()
    bound = tol * (scale + expected.double().abs())
    assert bool((error <= bound).all()), f"{name}: worst excess {(error - bound).max().item():.3g}"


def error_scales(inputs, upstream, gelu):
    """Natural magnitudes of the results, from the inputs (float64): with k = 1 + |xhat| + kappa / 100
    (kappa = max_c |z| rstd per row: float32 rounding of z, 2^-24 relative, reaches xhat as about
    6e-8 kappa, i.e. kappa / 170 of a 1e-5 tolerance; with C = 1 the variance is 0, rstd is
    1 / sqrt(eps) and the reference's xhat is that rounding noise):
    y ~ |w| k + |b|, d z ~ rstd max_c |w dy| per row, parameter gradients ~ sum_rows |dy| k per
    column (GELU' is at most 1.13)."""
    channels = inputs["x"].shape[-1]
    z = inputs["x"].double()
    for name in ("residual", "pre_bias"):
        if inputs[name] is not None:
            z = z + inputs[name].double()
    centred = z - z.mean(dim=-1, keepdim=True)
    rstd = (centred.square().mean(dim=-1, keepdim=True) + EPS).rsqrt()  # ... x 1
    kappa = z.abs().amax(dim=-1, keepdim=True) * rstd if z.numel() else rstd  # ... x 1
    k = 1 + (centred * rstd).abs() + kappa / 100
    weight, bias = inputs["weight"].double().abs(), inputs["bias"].double().abs()
    grad = upstream.double().abs() * (1.13 if gelu else 1.0)
    y_scale = weight * k + bias
    dz_scale = rstd * (weight * grad).amax(dim=-1, keepdim=True) if grad.numel() else rstd
    param_scale = (grad * k).reshape(-1, channels).sum(dim=0)  # C
    return y_scale, dz_scale, param_scale


def assert_matches_reference(inputs, gelu):
    y, grads, upstream = output_and_gradients(layer_norm_triton, inputs, gelu)
    y_ref, grads_ref, _ = output_and_gradients(layer_norm_reference, inputs, gelu)
    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
    y_scale, dz_scale, param_scale = error_scales(inputs, upstream, gelu)
    # Both compute in float32 from the same values (summation order, rsqrt, erf and exp differ);
    # bf16 results are rounded once at the end: a step or two of 2^-8.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    assert_within(y, y_ref, y_scale, tolerance[y.dtype], "y")
    for name, grad_ref in grads_ref.items():
        grad = grads[name]
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        scale = dz_scale if name in ("x", "residual") else param_scale
        assert_within(grad, grad_ref, scale, tolerance[grad.dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 32, 64, 100, 256])
@pytest.mark.parametrize("rows", [0, 1, 7, 130])
@pytest.mark.parametrize("extras", ["none", "all"])
def test_matches_reference(rows, channels, dtype, extras):
    on = extras == "all"
    inputs = make_inputs(rows, channels, dtype, residual=on, pre_bias=on, seed=rows * 7 + channels)
    assert_matches_reference(inputs, gelu=on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [64, 100])
@pytest.mark.parametrize("residual,pre_bias,gelu", [(True, False, False), (False, True, False),
                                                    (False, False, True), (True, False, True),
                                                    (False, True, True), (True, True, False)])
def test_each_extra(residual, pre_bias, gelu, channels, dtype):
    inputs = make_inputs(130, channels, dtype, residual=residual, pre_bias=pre_bias, seed=channels)
    assert_matches_reference(inputs, gelu=gelu)


def test_bf16_activations_with_float32_parameters():
    inputs = make_inputs(130, 64, torch.bfloat16, residual=True, pre_bias=True, param_dtype=torch.float32)
    inputs["pre_bias"] = inputs["pre_bias"].float()
    assert_matches_reference(inputs, gelu=True)


@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_residual_of_another_dtype_gets_its_own_gradient(x_dtype, residual_dtype):
    """Each gradient in its input's dtype and to that dtype's accuracy (the backward's saved xhat
    takes the wider of the two dtypes: a bf16 one would make the float32 residual's gradient
    bf16-accurate)."""
    inputs = make_inputs(300, 256, x_dtype, residual=True, pre_bias=False)
    inputs["residual"] = inputs["residual"].to(residual_dtype)
    assert_matches_reference(inputs, gelu=False)


def test_x_and_residual_gradients_accumulate_separately():
    """Leaf x and residual of one dtype share the backward's gradient buffer: their .grad fields must
    not share storage, so that two backward passes accumulate g1 + g2 in each (not g1 + 2 g2 in one)."""
    grads = {}
    for name, function in (("triton", layer_norm_triton), ("reference", layer_norm_reference)):
        inputs = make_inputs(9, 64, torch.float32, residual=True, pre_bias=False)
        x, residual = inputs["x"].requires_grad_(), inputs["residual"].requires_grad_()
        for scale in (1.0, 3.0):
            y = function(x, inputs["weight"], inputs["bias"], EPS, residual=residual)
            (y * torch.linspace(-1, 1, 64, device=DEVICE) * scale).sum().backward()
        assert x.grad.data_ptr() != residual.grad.data_ptr(), name
        grads[name] = (x.grad, residual.grad)
    for got, expected in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_without_weight_and_bias():
    inputs = make_inputs(7, 100, torch.float32, residual=True, pre_bias=True)
    x, residual, pre_bias = inputs["x"], inputs["residual"], inputs["pre_bias"]
    got = layer_norm_triton(x, None, None, EPS, residual=residual, pre_bias=pre_bias, gelu=True)
    expected = layer_norm_reference(x, None, None, EPS, residual=residual, pre_bias=pre_bias, gelu=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last_view", "permuted_copy", "transposed_residual"])
def test_non_contiguous_inputs(layout):
    """N x C x H x W tensors normalised over C through their N x H x W x C view: the channels-last
    one is contiguous in that order (read in place), the others are copied first."""
    generator = torch.Generator().manual_seed(3)
    nchw = torch.randn(2, 48, 5, 7, generator=generator) * 2 + 1
    if layout == "channels_last_view":
        nchw = nchw.to(memory_format=torch.channels_last)
    x = nchw.to(DEVICE).permute(0, 2, 3, 1)  # N x H x W x C
    assert x.is_contiguous() == (layout == "channels_last_view")
    residual = torch.randn(2, 5, 7, 48, generator=generator).to(DEVICE)
    if layout == "transposed_residual":
        residual = torch.randn(2, 7, 5, 48, generator=generator).to(DEVICE).transpose(1, 2)
    weight = (torch.randn(48, generator=generator) * 0.3 + 1).to(DEVICE)
    bias = torch.randn(48, generator=generator).to(DEVICE)
    assert_matches_reference({"x": x, "residual": residual, "pre_bias": None, "weight": weight, "bias": bias},
                             gelu=True)


def test_backward_is_deterministic():
    inputs = make_inputs(130, 64, torch.float32, residual=True, pre_bias=True)
    _, first, _ = output_and_gradients(layer_norm_triton, inputs, True)
    _, second, _ = output_and_gradients(layer_norm_triton, inputs, True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_errors():
    x = torch.randn(3, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        layer_norm_triton(torch.randn(2, MAX_C + 1, device=DEVICE), None, None, EPS)
    with pytest.raises(ValueError, match="C >= 1"):
        layer_norm_triton(torch.randn(3, 0, device=DEVICE), None, None, EPS)
    with pytest.raises(ValueError, match="pre_bias must have shape"):
        layer_norm_triton(x, weight, None, EPS, pre_bias=torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        layer_norm_reference(x, weight, None, EPS, residual=torch.zeros(3, 1, device=DEVICE))
    with pytest.raises(ValueError, match="weight must have shape"):
        resam_kernels.layer_norm(x, torch.ones(4, device=DEVICE), None, EPS)


def test_dispatcher():
    """Triton under the interpreter (or on CUDA), the reference with use_triton=False: same values."""
    inputs = make_inputs(7, 64, torch.float32, residual=True, pre_bias=True)
    args = (inputs["x"], inputs["weight"], inputs["bias"], EPS)
    extras = {"residual": inputs["residual"], "pre_bias": inputs["pre_bias"], "gelu": True}
    assert resam_kernels.runs_triton(inputs["x"]) == (DEVICE == "cuda" or resam_kernels.entropy.INTERPRET)
    torch.testing.assert_close(resam_kernels.layer_norm(*args, **extras),
                               resam_kernels.layer_norm(*args, **extras, use_triton=False), atol=1e-5, rtol=1e-5)
    assert torch.equal(resam_kernels.layer_norm(*args, **extras, use_triton=False),
                       layer_norm_reference(*args, **extras))


@pytest.mark.parametrize("wanted", ["x", "weight", "pre_bias", "residual"])
def test_gradient_of_one_input_only(wanted):
    """Frozen LayerNorm parameters (LoRA training) skip the column sums; any one input alone gets
    the same gradient as with all of them."""
    inputs = make_inputs(130, 64, torch.float32, residual=True, pre_bias=True, seed=9)
    _, all_grads, upstream = output_and_gradients(layer_norm_triton, inputs, True)
    leaves = {name: t.clone().requires_grad_(name == wanted) for name, t in inputs.items()}
    y = layer_norm_triton(leaves["x"], leaves["weight"], leaves["bias"], EPS, residual=leaves["residual"],
                          pre_bias=leaves["pre_bias"], gelu=True)
    (grad,) = torch.autograd.grad(y, leaves[wanted], upstream)
    assert torch.equal(grad, all_grads[wanted])


@pytest.mark.parametrize("residual,pre_bias", [(True, False), (False, False), (True, True)])
def test_what_the_backward_keeps(residual, pre_bias):
    """With a residual and no pre_bias the backward keeps one rows x C tensor (xhat), not x and
    the residual (the decoder frees both); otherwise x (and the residual) as given."""
    inputs = make_inputs(33, 64, torch.bfloat16, residual=residual, pre_bias=pre_bias, seed=5)
    x = inputs["x"].requires_grad_(True)
    res = inputs["residual"]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = layer_norm_triton(x, inputs["weight"], inputs["bias"], EPS, residual=res, pre_bias=inputs["pre_bias"])
    rows_by_c = [t for t in kept if t is not None and tuple(t.shape) == (33, 64)]
    storages = {t.untyped_storage().data_ptr() for t in rows_by_c}
    if residual and not pre_bias:
        assert len(rows_by_c) == 1
        assert x.untyped_storage().data_ptr() not in storages and res.untyped_storage().data_ptr() not in storages
    else:
        assert x.untyped_storage().data_ptr() in storages
        assert (res is None) or res.untyped_storage().data_ptr() in storages
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
