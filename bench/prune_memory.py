"""Peak memory of pruning in memory and block by block (``--low-memory``), against the model's size.

    python -m seftkit.bench.prune_memory [--model smollm2-135m] [--method wanda] [--nsamples 4] [--seqlen 128]
        [--large-dtype fp32] [--large-in-memory] [--skip-large] [--json P]

Every prune runs in a fresh child process, so its peak resident set (``VmHWM``) is its own; a child that
only imports torch and transformers gives the floor every run pays. The large model is random, with the shapes
of a LLaMA-3.2-1B (16 blocks, hidden 2048, MLP 8192, vocab 128256, tied embeddings), written once block by block
into a temporary folder (its weights are never all in memory here either) and deleted afterwards; nothing is
downloaded. Pruning it in memory needs about its own size in RAM, so that run is opt-in (``--large-in-memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seftkit.io import write_json
from seftkit.models import DEFAULT_MODEL, resolve_model_path
from seftkit.sparsity.scanner import checkpoint_files, read_checkpoint

LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)

_CHILD = """
import json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers  # the floor: what every run imports
from seftkit.prune import prune_checkpoint
from seftkit.sparsity.pattern import parse_pattern
start, cpu = time.perf_counter(), time.process_time()
if args["model"]:
    prune_checkpoint(args["model"], args["method"], parse_pattern(0.5), out=args["out"], nsamples=args["nsamples"],
                     seqlen=args["seqlen"], device="cpu", progress=False, dtype=args["dtype"],
                     low_memory=args["low_memory"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
peak_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"peak_mb": peak_kb / 1024,
                  "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}))
"""


@dataclass
class Row:
    model: str
    weights_mb: float
    fp32_mb: float
    mode: str
    peak_rss_mb: float
    wall_s: float
    cpu_s: float

    @property
    def vs_fp32(self) -> float:
        return self.peak_rss_mb / self.fp32_mb


def sizes(folder: Path) -> tuple[float, float]:
    """(stored size, fp32 size) of a checkpoint's tensors, in MiB."""
    infos = read_checkpoint(checkpoint_files(folder))
    return sum(i.nbytes for i in infos) / 2**20, sum(i.numel * 4 for i in infos) / 2**20


def run_child(model: str | None, out: Path, method: str, nsamples: int, seqlen: int, low_memory: bool,
              dtype: str = "auto") -> dict[str, float]:
    args = dict(model=model, out=str(out), method=method, nsamples=nsamples, seqlen=seqlen, low_memory=low_memory,
                dtype=dtype)
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_random_llama(folder: Path, dtype: str) -> Path:
    """A random LLaMA-1B-shaped checkpoint, one safetensors shard per block, never all in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from seftkit.models import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    config = LlamaConfig(**LLAMA_1B_SHAPE, dtype=torch_dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    groups: dict[str, list[str]] = {}
    for name in model.state_dict():
        if name != "lm_head.weight":  # tied to the embeddings
            parts = name.split(".")
            groups.setdefault(parts[2] if parts[1] == "layers" else "rest", []).append(name)
    shapes = {name: param.shape for name, param in model.state_dict().items()}
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, names in enumerate(groups.values()):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.ones(shapes[name]) if name.endswith("norm.weight")
                          else torch.randn(shapes[name], generator=generator) * 0.02).to(torch_dtype)
                   for name in names}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    # the default model's tokenizer: its 49152 ids fit the 128256-token vocabulary
    for path in resolve_model_path(DEFAULT_MODEL).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(path, folder / path.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--large-dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--large-in-memory", action="store_true", help="Also prune the large model in memory.")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="seftkit-prune-memory-") as tmp:
        tmp_path = Path(tmp)
        floor = run_child(None, tmp_path / "none", args.method, 1, 1, False)["peak_mb"]
        models = [(args.model, resolve_model_path(args.model), True)]
        if not args.skip_large:
            large = tmp_path / "llama-1b-shape"
            large.mkdir()
            print(f"writing a random LLaMA-1B-shaped model ({args.large_dtype}) to {large}", file=sys.stderr)
            models.append(("llama-1b-shape (random)", write_random_llama(large, args.large_dtype),
                           args.large_in_memory))
        for label, folder, in_memory in models:
            stored, fp32 = sizes(folder)
            for low_memory in (False, True) if in_memory else (True,):
                mode = "low-memory" if low_memory else "in-memory"
                print(f"{label}: {mode} ...", file=sys.stderr, flush=True)
                result = run_child(str(folder), tmp_path / f"out-{len(rows)}", args.method, args.nsamples,
                                   args.seqlen, low_memory)
                rows.append(Row(label, stored, fp32, mode, result["peak_mb"], result["wall_s"], result["cpu_s"]))
    print(f"\n{args.method}, calibration {args.nsamples} x {args.seqlen} tokens, CPU, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; floor (python + torch + transformers imported) {floor:.0f} MiB")
    print(f"{'model':<26} {'weights MiB':>11} {'fp32 MiB':>9} {'mode':<11} {'peak RSS MiB':>12} {'/ fp32':>7} "
          f"{'wall s':>7} {'cpu s':>7}")
    for r in rows:
        print(f"{r.model:<26} {r.weights_mb:>11.0f} {r.fp32_mb:>9.0f} {r.mode:<11} {r.peak_rss_mb:>12.0f} "
              f"{r.vs_fp32:>7.2f} {r.wall_s:>7.1f} {r.cpu_s:>7.1f}")
    if args.json:
        write_json(args.json, {"floor_mb": floor, "rows": rows})


if __name__ == "__main__":
    main()
