"""The cuda24 backend where CUDA 2:4 cannot run: a warning, and the model left exactly as it was.

"Stays dense" is checked as what it means: the same module types, plain-tensor parameters (a semi-structured
2:4 tensor is a tensor subclass whose ``is_sparse`` is False, so ``is_sparse`` cannot tell) and the same bytes.
CUDA's absence is simulated, so this runs on GPU machines too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from seftkit.kernels import cuda24, sparsify_model
from seftkit.prune import prune_model
from seftkit.sparsity.pattern import parse_pattern


class _Packed(torch.Tensor):
    """Stands in for a compressed weight: a tensor subclass that, like the 2:4 one, is not ``is_sparse``."""


def snapshot(model: torch.nn.Module) -> dict[str, tuple[type, type, bytes]]:
    modules = {name: (type(module), type(None), b"") for name, module in model.named_modules()}
    params = {name: (type(p), type(p.data), p.detach().contiguous().view(torch.uint8).numpy().tobytes())
              for name, p in model.named_parameters()}
    return {**modules, **params}


def pruned_24():
    model, tokenizer = make_tiny_model("llama")
    prune_model(model, tokenizer, "magnitude", parse_pattern(None, "2:4"), progress=False)
    return model.to(torch.bfloat16)


def sparsify_without_cuda(model: torch.nn.Module, monkeypatch) -> None:
    monkeypatch.setattr(cuda24, "unavailable_reason", lambda: "CUDA is not available")
    with pytest.warns(RuntimeWarning, match="cuda24 backend skipped: CUDA is not available; the model stays dense"):
        sparsify_model(model, backend="cuda24")


def test_cuda24_without_cuda_warns_and_leaves_the_model_unchanged(monkeypatch):
    model = pruned_24()
    before = snapshot(model)
    sparsify_without_cuda(model, monkeypatch)
    assert snapshot(model) == before
    assert all(type(p.data) is torch.Tensor for p in model.parameters())


def test_the_unchanged_check_sees_a_swapped_weight_that_is_sparse_says_not(monkeypatch):
    model = pruned_24()
    before = snapshot(model)
    sparsify_without_cuda(model, monkeypatch)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(_Packed), requires_grad=False)
    assert not any(getattr(p, "is_sparse", False) for p in model.parameters())  # the old check passes
    assert snapshot(model) != before
