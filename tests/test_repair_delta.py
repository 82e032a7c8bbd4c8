"""The sparse-delta linear: parity with a dense reference, gradcheck, autocast, and O(k) saved state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from seftkit.models import linear_weight
from seftkit.repair.delta import (
    SparseDeltaFunction,
    SparseDeltaLinear,
    applied_delta,
    effective_weight,
    replace_module,
)

OUT, IN, K = 6, 8, 10


def _layer(kind: str = "linear", dtype: torch.dtype = torch.float32, seed: int = 0) -> SparseDeltaLinear:
    torch.manual_seed(seed)
    base = Conv1D(OUT, IN) if kind == "conv1d" else nn.Linear(IN, OUT)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
        linear_weight(base)[:, ::2] = 0  # pruned half
    base.to(dtype)
    indices = torch.randperm(OUT * IN)[:K]
    layer = SparseDeltaLinear(base, indices)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def _dense_reference(layer: SparseDeltaLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input grad and delta grad computed with an ordinary dense fp32 weight."""
    x = x.detach().clone().requires_grad_(True)
    delta = layer.values.detach().clone().requires_grad_(True)
    weight = linear_weight(layer.base).detach().float()
    effective = weight.reshape(-1).index_add(0, layer.indices.long(), delta).reshape(weight.shape)
    y = torch.nn.functional.linear(x, effective, layer.base.bias.detach().float())
    y.pow(2).sum().backward()
    return y.detach(), x.grad, delta.grad


def _sparse(layer: SparseDeltaLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    layer.values.grad = None
    y = layer(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, layer.values.grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_matches_dense_reference_fp32(kind):
    layer = _layer(kind)
    x = torch.randn(2, 3, IN)
    for got, want in zip(_sparse(layer, x), _dense_reference(layer, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None


def test_matches_dense_reference_with_bf16_weight():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(2, 3, IN)
    y, grad_x, grad_d = _sparse(layer, x)
    assert y.dtype == torch.float32 and grad_d.dtype == torch.float32
    for got, want in zip((y, grad_x, grad_d), _dense_reference(layer, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_bf16_weight_keeps_small_delta_exactly_at_its_position():
    # W + d is formed in fp32 and rounded once, so a tiny d on a large bf16 W is not lost before rounding
    weight = torch.full((1, 1), 256.0, dtype=torch.bfloat16)
    indices = torch.tensor([0])
    assert effective_weight(weight, indices, torch.tensor([1.5]), torch.bfloat16).item() == 258.0
    assert effective_weight(weight, indices, torch.tensor([1.5]), torch.float32).item() == 257.5


BF16_RTOL = 2.0**-8  # one rounding of an fp32-accumulated result to bf16 (8 significant bits): <= 2^-9 relative


def _bf16_reference(layer: SparseDeltaLinear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same bf16 math in float64: output, and delta gradient for the loss ``sum(y.float()**2)``.

    The operands are what autocast gives the layer (x and ``W + d`` rounded once to bf16); the upstream gradient
    is ``2 y`` in bf16 (exact from the layer's own ``y``), so the only difference left is the layer's final
    rounding to bf16 (and fp32 summation order), which ``BF16_RTOL`` covers.
    """
    weight = linear_weight(layer.base).detach().double()
    effective = weight.reshape(-1).index_add(0, layer.indices.long(), layer.values.detach().double())
    effective = effective.reshape(weight.shape).bfloat16().double()
    x_b = x.bfloat16().double()
    bias = layer.base.bias.detach().bfloat16().double()
    grad_y = (2 * y.detach().float()).bfloat16().double()
    dense_grad = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_b.reshape(-1, x_b.shape[-1])
    return x_b @ effective.t() + bias, dense_grad.reshape(-1)[layer.indices.long()]


def assert_autocast_matches_bf16_reference(layer: SparseDeltaLinear, x: torch.Tensor) -> None:
    layer.values.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert layer.values.grad.dtype == torch.float32
    want_y, want_grad = _bf16_reference(layer, x, y)
    # atol only for sums that cancel to near 0, far below the values compared (gradients 0.26 to 21 here)
    torch.testing.assert_close(y.double(), want_y, rtol=BF16_RTOL, atol=1e-3)
    torch.testing.assert_close(layer.values.grad.double(), want_grad, rtol=BF16_RTOL, atol=1e-3)


def test_autocast_computes_in_bf16_and_keeps_delta_fp32():
    layer = _layer()
    x = torch.randn(4, IN)
    assert_autocast_matches_bf16_reference(layer, x)
    grad = layer.values.grad.abs()
    assert grad.min() < 0.5 < grad.max()  # the sabotage below zeroes a real part of this range


@pytest.mark.parametrize("sabotage", ["zero gradients below 0.5", "drop the delta from the forward"])
def test_the_bf16_reference_catches_a_broken_layer(sabotage, monkeypatch):
    """The tolerance is tight enough to see a gradient band zeroed (which the earlier ``atol=0.5`` against an
    fp32 reference let pass) or the delta left out of the forward."""
    backward, forward = SparseDeltaFunction.backward, SparseDeltaFunction.forward

    def zero_small(ctx, grad_y):
        grads = list(backward(ctx, grad_y))
        grads[4] = grads[4].masked_fill(grads[4].abs() < 0.5, 0.0)
        return tuple(grads)

    def without_delta(ctx, x, weight, bias, indices, values, grad_hook):
        return forward(ctx, x, weight, bias, indices, torch.zeros_like(values), grad_hook)

    if sabotage.startswith("zero"):
        monkeypatch.setattr(SparseDeltaFunction, "backward", staticmethod(zero_small))
    else:
        monkeypatch.setattr(SparseDeltaFunction, "forward", staticmethod(without_delta))
    with pytest.raises(AssertionError):
        assert_autocast_matches_bf16_reference(_layer(), torch.randn(4, IN))


def test_gradcheck_float64():
    torch.manual_seed(1)
    weight = torch.randn(3, 4, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    values = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, bias, values):
        return SparseDeltaFunction.apply(x, weight, bias, indices, values, None)

    assert torch.autograd.gradcheck(fn, (x, bias, values))


def test_hook_receives_the_dense_weight_gradient_and_effective_weight():
    layer = _layer()
    x = torch.randn(5, IN)
    seen = {}
    layer.grad_hook = lambda grad, effective: seen.update(grad=grad.clone(), effective=effective.clone())
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.testing.assert_close(seen["grad"], grad_y.t() @ x)
    weight = linear_weight(layer.base).detach().clone()
    weight.view(-1)[layer.indices.long()] += layer.values.detach()
    torch.testing.assert_close(seen["effective"], weight)
    torch.testing.assert_close(layer.values.grad, seen["grad"].view(-1)[layer.indices.long()])


def test_nothing_dense_is_saved_for_backward_besides_the_weight():
    layer = _layer()
    weight = linear_weight(layer.base)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    before = weight.clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(torch.randn(3, IN, requires_grad=True)).sum().backward()
    assert saved and all(t.numel() < OUT * IN for t in saved)  # W is held by reference, not saved
    assert torch.equal(weight, before)  # the delta written into W for each matmul was taken out again
    # the module's own O(out*in) state: the frozen weight and the active mask as bits, nothing else
    tensors = [*layer.parameters(), *layer.buffers()]
    big = [t for t in tensors if t.numel() >= OUT * IN]
    assert len(big) == 1 and big[0].data_ptr() == layer.base.weight.data_ptr()
    assert layer.active_bits.dtype == torch.uint8 and layer.active_bits.numel() == OUT * IN // 8
    assert layer.values.shape == (K,) and layer.indices.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applied_delta_is_the_effective_weight_and_restores_w_even_on_error(dtype):
    layer = _layer()
    weight = linear_weight(layer.base)
    with torch.no_grad():
        layer.values.normal_()
    before = weight.clone()
    expected = effective_weight(weight, layer.indices, layer.values, dtype)
    with pytest.raises(ZeroDivisionError), applied_delta(weight, layer.indices, layer.values, dtype) as effective:
        assert torch.equal(effective, expected) and effective.dtype == dtype
        assert (effective.data_ptr() == weight.data_ptr()) == (dtype == weight.dtype)  # in place when it can be
        raise ZeroDivisionError
    assert torch.equal(weight, before)


def test_a_weight_shared_with_an_unwrapped_linear_still_backpropagates():
    """The delta is written into W for each matmul; an ordinary op that saved the same W for its backward must
    neither see the write nor fail autograd's in-place check (W.data carries no version)."""
    torch.manual_seed(0)
    linear, plain = nn.Linear(IN, IN), nn.Linear(IN, IN)
    plain.weight = linear.weight
    wrapped = SparseDeltaLinear(linear, torch.arange(K))
    plain.requires_grad_(False)
    with torch.no_grad():
        wrapped.values.normal_()
    x = torch.randn(2, IN, requires_grad=True)
    wrapped(plain(x)).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    effective = effective_weight(linear.weight, wrapped.indices, wrapped.values, torch.float32)
    (F.linear(F.linear(reference_x, linear.weight.detach(), plain.bias), effective, linear.bias)).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)


def test_frozen_base_active_mask_and_replace_module():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU())
    with torch.no_grad():
        model[0].weight[0] = 0
    wrapped = SparseDeltaLinear(model[0], torch.arange(K))
    assert replace_module(model, "0", wrapped) is wrapped.base
    assert model[0] is wrapped
    assert not wrapped.base.weight.requires_grad and wrapped.values.requires_grad
    assert int(wrapped.active.sum()) == OUT * IN - IN
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["0.values"]


def test_merge_and_clear_write_through_conv1d_views():
    layer = _layer("conv1d")
    expected = effective_weight(layer.weight, layer.indices, layer.values, torch.float32) * layer.active
    layer.clear_weights(torch.tensor([0, 2]))  # already pruned (even columns): nothing changes
    base = layer.merge_into_base()
    assert isinstance(base, Conv1D)
    torch.testing.assert_close(base.weight.t(), expected.detach())
    assert base.weight[3, 1] != 0
    layer.clear_weights(torch.tensor([IN + 3]))  # row 1, input 3 of the [out, in] view
    assert base.weight[3, 1] == 0 and int((base.weight == 0).sum()) == int((expected == 0).sum()) + 1
