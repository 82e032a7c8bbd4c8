"""The baselines SEFT is measured against, as :class:`RepairMethod` s driven by the same training loop.

- ``lora-prune`` (the paper's LoRA*): dense LoRA (peft) on the target linears, merged, then re-pruned to each
  layer's original nnz (or N:M). Sparsity is lost during training and forced back afterwards.
- ``masked-lora`` (SQFT's SparsePEFT): ``y = x (W + (B A) * M)^T``; the update is masked in the forward, so the
  merge ``W + (B A) * M`` keeps the support exactly. Costs a dense ``out x in`` update per layer per forward.
- ``static``: every active weight trains, gradients masked to the support. The memory ceiling: optimizer state
  for whole matrices.

LoRA ranks come from the same budget as SEFT: rank ``r`` costs ``r * (in + out)`` parameters per layer, exactly
SEFT's ``k_l`` under ``--lora-rank-equivalent r``; a ``--delta-density`` budget is converted to the rank whose
total parameter count is closest.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seftkit.errors import SeftkitError
from seftkit.models import linear_weight
from seftkit.repair.config import RepairConfig
from seftkit.repair.delta import replace_module
from seftkit.repair.method import RepairMethod
from seftkit.repair.sharding import full_linear_weight, write_linear_weight
from seftkit.sparsity.masks import nm_mask, smallest_mask
from seftkit.sparsity.pattern import parse_nm
from seftkit.sparsity.targets import TargetRule

LORA_ALPHA_PER_RANK = 2.0  # lora_alpha = 2 r, i.e. a fixed update scale of 2 whatever the rank


def lora_rank(config: RepairConfig, targets: dict[str, nn.Module]) -> int:
    """The LoRA rank whose parameter count matches SEFT's budget on these layers."""
    if config.delta_density is None:
        return int(config.lora_rank_equivalent)
    shapes = [linear_weight(m).shape for m in targets.values()]
    total_k = sum(config.delta_density * out * inp for out, inp in shapes)
    return max(1, round(total_k / sum(out + inp for out, inp in shapes)))


def freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def support(module: nn.Module) -> torch.Tensor:
    """Keep-mask ([out, in]) of a linear's current non-zeros."""
    return linear_weight(module).detach() != 0


class StaticSparse(RepairMethod):
    """Fixed-mask sparse fine-tuning: train the target weights, gradients multiplied by the support mask.

    With zero gradients AdamW's moments stay zero at pruned positions, so their update is exactly zero and
    decoupled weight decay only rescales zeros; :meth:`merge` still re-applies the mask as the guarantee.
    """

    name = "static"
    trains_base_weights = True

    def attach(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        freeze(model)
        self.weights: list[nn.Parameter] = []
        self.masks: list[torch.Tensor] = []
        self.hooks = []
        for module in targets.values():
            weight = module.weight
            mask = weight.detach() != 0  # in the parameter's own layout (GPT-2 Conv1D is [in, out])
            weight.requires_grad_(True)
            self.hooks.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
            self.weights.append(weight)
            self.masks.append(mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.weights

    def trainable_count(self) -> int:
        """Active weights only: the pruned positions are stored and carry optimizer state, but never learn."""
        return int(sum(int(mask.sum()) for mask in self.masks))

    def merge(self) -> None:
        for hook in self.hooks:
            hook.remove()
        with torch.no_grad():
            for weight, mask in zip(self.weights, self.masks, strict=True):
                weight.mul_(mask)
                weight.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mask, saved in zip(self.masks, state["masks"], strict=True):
            if not torch.equal(mask, saved.to(mask.device)):
                raise SeftkitError("checkpoint masks do not match the input model; was it re-pruned?")


class MaskedLoraLinear(nn.Module):
    """``y = x (W + s (B A) * M)^T + b`` around a frozen linear (nn.Linear or GPT-2 Conv1D)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        weight = linear_weight(base)
        out_features, in_features = weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # peft's LoRA init: B = 0, so the start is W
        self.scaling = scaling
        self.register_buffer("mask", weight.detach() != 0, persistent=False)

    def delta(self) -> torch.Tensor:
        """The masked dense update ([out, in]); it exists for every forward, which is this method's cost."""
        return (self.lora_b @ self.lora_a) * self.scaling * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = linear_weight(self.base)
        return F.linear(x, weight + self.delta().to(weight.dtype), self.base.bias)


class MaskedLora(RepairMethod):
    """SQFT's SparsePEFT: LoRA whose update is masked by the support, so merging keeps sparsity exact."""

    name = "masked-lora"

    def attach(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        freeze(model)
        self.model = model
        self.rank = lora_rank(self.config, targets)
        self.wrapped = {name: MaskedLoraLinear(module, self.rank, LORA_ALPHA_PER_RANK) for name, module in
                        targets.items()}
        for name, wrapper in self.wrapped.items():
            replace_module(model, name, wrapper)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for wrapper in self.wrapped.values() for p in (wrapper.lora_a, wrapper.lora_b)]

    def merge(self) -> None:
        with torch.no_grad():
            for name, wrapper in self.wrapped.items():
                weight = full_linear_weight(wrapper.base)  # gathered when sharded (FSDP)
                write_linear_weight(wrapper.base, weight + wrapper.delta().to(weight.dtype))
                replace_module(self.model, name, wrapper.base)

    def summary(self) -> dict[str, Any]:
        return {"lora_rank": self.rank}


class LoraPrune(RepairMethod):
    """Dense LoRA via peft, merged, then re-pruned with Wanda to each layer's original nnz (or to ``--nm``).

    Wanda needs calibration activations; the method keeps the token rows of the last training micro-batches
    (``CALIBRATION_ROWS``, saved in checkpoints so a resumed run re-prunes identically) and runs the shared
    block-by-block Wanda statistics (:mod:`seftkit.prune.calibrate`) on the merged model. Layers whose rows all
    held the same nnz (Wanda's own output) are re-pruned per row, others per matrix: either way the layer ends
    with exactly its input nnz. Targets outside the decoder blocks fall back to magnitude.
    """

    name = "lora-prune"
    CALIBRATION_ROWS = 32

    def attach(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        from peft import LoraConfig, get_peft_model

        self.rank = lora_rank(self.config, targets)
        self.nnz = {name: int(support(module).sum()) for name, module in targets.items()}
        self.row_nnz = {name: uniform_row_nnz(support(module)) for name, module in targets.items()}
        self.calibration: list[torch.Tensor] = []
        self.hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        lora = LoraConfig(r=self.rank, lora_alpha=LORA_ALPHA_PER_RANK * self.rank, lora_dropout=0.0,
                          target_modules=list(targets), bias="none")
        self.peft_model = get_peft_model(model, lora)  # freezes the rest and swaps the targets in place

    def _record_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and input_ids is not None:
            self.calibration = [*self.calibration, *input_ids.detach().cpu()][-self.CALIBRATION_ROWS:]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def merge(self) -> None:
        from seftkit.models import eval_mode

        self.hook.remove()
        model = self.peft_model.merge_and_unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
        with eval_mode(model):
            left = self._reprune_wanda(model)
        for name in left:  # outside the decoder blocks: no block inputs to calibrate on
            module = model.get_submodule(name)
            self._reprune(name, module, linear_weight(module).detach().abs())

    def _reprune_wanda(self, model: nn.Module) -> set[str]:
        """Wanda re-pruning block by block; returns the targets it did not reach."""
        from seftkit.models import find_decoder_layers
        from seftkit.prune.calibrate import prune_blockwise
        from seftkit.prune.wanda import input_sq_norms, wanda_scores

        left = set(self.nnz)
        if not self.calibration:
            return left
        width = max(row.numel() for row in self.calibration)
        # Task rows differ in width; pad each with its own last token (already padding when it was padded).
        windows = torch.stack([F.pad(row, (0, width - row.numel()), value=int(row[-1])) for row in self.calibration])

        def prune_linear(name: str, module: nn.Module, mean_sq: torch.Tensor) -> None:
            if name in left:
                left.discard(name)
                self._reprune(name, module, wanda_scores(linear_weight(module), mean_sq.to(module.weight.device)))

        layers_name, layers = find_decoder_layers(model)
        rule = TargetRule(include="^(?:" + "|".join(re.escape(f"{name}.weight") for name in self.nnz) + ")$")
        prune_blockwise(model, layers_name, layers, windows, rule, input_sq_norms, prune_linear, progress=False)
        return left

    @torch.no_grad()
    def _reprune(self, name: str, module: nn.Module, scores: torch.Tensor) -> None:
        weight = linear_weight(module)
        if self.config.nm:
            keep = nm_mask(scores, *parse_nm(self.config.nm))
        elif self.row_nnz[name] is not None:
            keep = top_per_row(scores, self.row_nnz[name])
        else:
            keep = smallest_mask(scores, weight.numel() - self.nnz[name])
        weight.mul_(keep)

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": list(self.calibration)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calibration = list(state["calibration"])

    def summary(self) -> dict[str, Any]:
        return {"lora_rank": self.rank, "reprune": "wanda", "calibration_rows": len(self.calibration)}


def uniform_row_nnz(keep: torch.Tensor) -> int | None:
    """The per-row nnz when every row of a keep-mask has the same count (as Wanda leaves them), else None."""
    counts = keep.sum(dim=1)
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def top_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of the ``count`` highest scores of every row (ties broken by position)."""
    order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :count], True)
    return keep
