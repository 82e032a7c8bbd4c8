"""Export sizes of a magnitude-pruned model in every format: the README table.

Prunes copies of the model (|W| magnitude, per matrix, or 2:4), exports each copy with ``export_model`` (which
reads every export back and checks it) and prints one markdown row per export: size against the dense
safetensors of the same tensors, load time and read-back parity, all measured in this run.

    python -m seftkit.bench.export_sizes --model smollm2-135m --out runs/export-sizes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from seftkit.exporters.registry import FORMATS, get_format

# (label, --sparsity, --nm) of the pruned copies; every format's bench variants are exported from each
PATTERNS = {"50%": (0.5, None), "70%": (0.7, None), "2:4": (None, "2:4")}
EXPORTS = {variant.name: (fmt.name, variant) for fmt in FORMATS.values() for variant in fmt.bench}


def applies(export: str, label: str) -> bool:
    """Whether the variant fits the copy (e.g. the 2:4 layout only for 2:4 copies), as its registry entry says."""
    return EXPORTS[export][1].applies(*PATTERNS[label])


def prune_copy(model_spec: str, label: str, out: Path) -> Path:
    """Magnitude-prune every targeted weight of a fresh copy and save it as an HF folder."""
    import torch

    from seftkit.io import atomic_dir
    from seftkit.models import linear_weight, load_model, save_model, target_linears
    from seftkit.sparsity.masks import pattern_mask
    from seftkit.sparsity.pattern import parse_pattern

    sparsity, nm = PATTERNS[label]
    pattern = parse_pattern(sparsity, nm)
    model, tokenizer = load_model(model_spec, dtype="auto")
    with torch.no_grad():
        for module in target_linears(model).values():
            weight = linear_weight(module)
            weight.masked_fill_(~pattern_mask(weight.abs(), pattern), 0)
    with atomic_dir(out, overwrite=True) as tmp:
        save_model(model, tokenizer, tmp)
    return out


def main() -> None:
    from seftkit.exporters import export_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("runs/export-sizes"))
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma list of {', '.join(PATTERNS)}")
    parser.add_argument("--exports", default=",".join(EXPORTS), help=f"comma list of {', '.join(EXPORTS)}")
    args = parser.parse_args()

    print("| pattern | export | layout | size MB | vs dense | load s | read back |")
    print("|---|---|---|---:|---:|---:|---|")
    for label in args.patterns.split(","):
        src = prune_copy(args.model, label, args.out / f"pruned-{label.replace(':', '-').rstrip('%')}")
        for name in (e for e in args.exports.split(",") if applies(e, label)):
            fmt, variant = EXPORTS[name]
            report = export_model(src, fmt, args.out / f"{src.name}-{name}", overwrite=True, options=variant.options)
            diff = report.parity["max_abs_diff"]
            proof = "bit-exact" if diff == 0.0 else f"max abs diff {diff:.1e}"
            print(f"| {label} | {name} | {report.layout.split(' (')[0]} | {report.export_bytes / 1e6:.1f} | "
                  f"{report.size_ratio:.3f} | {report.load_seconds:.2f} | {proof} |", flush=True)
    copy_mb = report.dense_bytes / get_format(fmt).weight_copies / 1e6
    print(f"\ndense = the same tensors stored dense in the same dtype ({copy_mb:.1f} MB here), once per file that "
          "holds every weight (ONNX's two graphs compare with two copies)")


if __name__ == "__main__":
    main()
