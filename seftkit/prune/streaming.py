"""Prune a checkpoint without ever holding the whole model: one decoder block resident at a time.

The model is built with empty (meta) weights from its config; the tensors outside the decoder blocks
(embeddings, final norm, head) are loaded to run the model up to its first block, then written out and released.
Each block is then loaded from the safetensors files just before it is needed, pruned (with the same loop and
the same arithmetic as the in-memory path, so the result is bit-identical), written to its own shard and released.
Peak memory is about the non-block tensors during calibration capture, or one block plus the calibration
activations afterwards.

The output keeps the input's tensor names, one safetensors shard per block plus one for the rest, with the
usual ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from seftkit.errors import SeftkitError, first_line
from seftkit.models import check_finite
from seftkit.sparsity.scanner import INDEX_FILE, checkpoint_files, read_checkpoint


def empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder`` with its parameters on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise SeftkitError(f"cannot build the model of {folder}: {first_line(exc)}") from None
    return model.eval()


def model_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> model tensor name, renamed as ``from_pretrained`` renames them (transformers 5's
    per-architecture renamings, the base-model prefix added or stripped). Keys that loading would transform
    (merged, split or permuted) cannot be streamed one block at a time and are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    meta = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", None)
    names = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, converter = rename_source_key(key, [], [], prefix, meta)
        if name not in meta:
            raise SeftkitError(f"checkpoint tensor {key} does not match the model's names; prune without --low-memory")
        if converter is not None:
            raise SeftkitError(f"checkpoint tensor {key} is converted when loaded; prune without --low-memory")
        names[key] = name
    return names


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


class StreamedCheckpoint:
    """Loads, writes and releases groups of a model's tensors: the non-block rest, or one decoder block.

    Implements :class:`seftkit.prune.calibrate.BlockResidency`. Model tensor names map to checkpoint names as
    transformers would map them (the same, or without/with the ``base_model_prefix``); output files keep the
    checkpoint names.
    """

    def __init__(self, folder: Path, out: Path, model: nn.Module, layers_name: str, num_blocks: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.out, self.dtype, self.device = model, out, dtype, device
        self.layers_name, self.num_blocks = layers_name, num_blocks
        infos = read_checkpoint(checkpoint_files(folder))
        self.file_of = {info.name: info.file for info in infos}
        self.key_of = {name: key for key, name in model_names(model, list(self.file_of)).items()}
        self.groups: dict[int | None, list[str]] = defaultdict(list)
        for name in self.key_of:
            self.groups[self.block_of(name)].append(name)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def block_of(self, name: str) -> int | None:
        """The decoder block a tensor belongs to, or ``None`` for the rest of the model."""
        head = f"{self.layers_name}."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() and int(index) < self.num_blocks else None

    def shard_name(self, group: int | None) -> str:
        index = self.num_blocks + 1 if group is None else group + 1
        return f"model-{index:05d}-of-{self.num_blocks + 1:05d}.safetensors"

    def _load(self, group: int | None) -> None:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in self.groups[group]:
            by_file[self.file_of[self.key_of[name]]].append(name)
        current = self.model.state_dict(keep_vars=True)
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(self.key_of[name])
                    if tensor.is_floating_point():
                        tensor = tensor.to(current[name].dtype)
                    _assign(self.model, name, tensor.to(self.device))

    def _write(self, group: int | None) -> None:
        from safetensors.torch import save_file

        state = self.model.state_dict()
        tensors, seen = {}, set()
        for name in self.groups[group]:
            tensor = state[name].detach().contiguous().cpu()
            if tensor.data_ptr() in seen:  # a tied tensor stored under two names: safetensors wants copies
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            tensors[self.key_of[name]] = tensor
        shard = self.shard_name(group)
        save_file(tensors, self.out / shard, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = shard
            self.total_size += tensor.numel() * tensor.element_size()

    def _release(self, group: int | None) -> None:
        """Put the group's loaded tensors, and every parameter tied to them, back on the meta device."""
        state = self.model.state_dict(keep_vars=True)
        names = set(self.groups[group])
        names.update(n for n, _ in self.model.named_parameters(remove_duplicate=False) if self.block_of(n) == group)
        for name in names:
            _assign(self.model, name, torch.empty_like(state[name], device="meta"))

    def load_rest(self) -> None:
        """Load every tensor outside the decoder blocks and re-tie shared embeddings."""
        self._load(None)
        self.model.tie_weights()
        for name, param in self.model.named_parameters():
            if param.is_meta and self.block_of(name) is None:
                raise SeftkitError(f"the checkpoint has no tensor for {name}; prune without --low-memory")
            if not param.is_meta and not torch.isfinite(param).all():
                raise SeftkitError(f"weight {name} contains NaN or inf values; the model is corrupt")

    def load(self, index: int) -> None:
        """Load block ``index`` (refusing missing tensors and NaN/inf weights)."""
        self._load(index)
        block = self.model.get_submodule(f"{self.layers_name}.{index}")
        for name, param in block.named_parameters():
            if param.is_meta:
                raise SeftkitError(f"the checkpoint has no tensor for block {index}'s {name}")
        check_finite(block)

    def release(self, index: int) -> None:
        """Write block ``index`` (pruned by now) and free it."""
        self._write(index)
        self._release(index)

    def inputs_captured(self) -> None:
        self.write_rest()

    def write_rest(self) -> None:
        """Write the non-block tensors and release them (calibration no longer needs the embeddings)."""
        self._write(None)
        self._release(None)

    def finish(self, folder: Path) -> None:
        """The shard index, config (with the output dtype), generation config and tokenizer files."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self.model.config.dtype = self.dtype
        self.model.config.save_pretrained(self.out)
        if (folder / "generation_config.json").is_file():
            shutil.copy2(folder / "generation_config.json", self.out / "generation_config.json")
        elif getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.out)

