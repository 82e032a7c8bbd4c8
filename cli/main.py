"""``seftkit`` entry point. Commands load lazily so ``seftkit verify`` starts without importing torch."""

from __future__ import annotations

import importlib
import importlib.util

import click

from seftkit import __version__
from seftkit.cli.common import DEBUG_ENV, exit_codes

# name -> (module, one-line help). Command modules import heavy libraries inside the command body only.
COMMANDS = {
    "prune": ("seftkit.cli.prune", "Prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)."),
    "repair": ("seftkit.cli.repair", "Repair a sparse model with SEFT (or a baseline) without losing sparsity."),
    "verify": ("seftkit.cli.verify", "Prove a model folder is sparse (reads safetensors; no torch needed)."),
    "bench": ("seftkit.cli.bench", "Measure sparse vs dense inference speed on this machine."),
    "export": ("seftkit.cli.export", "Export a sparse model: plain HF + manifest, CSR, compressed-tensors, ONNX."),
    "eval": ("seftkit.cli.eval", "Perplexity and zero-shot multiple-choice accuracy, offline."),
    "generate": ("seftkit.cli.generate", "Generate text on the sparse kernels; prefill and decode tokens/s."),
    "plot": ("seftkit.cli.plot", "Draw a repair or verify JSON report as a PNG (needs matplotlib)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[name]
        with exit_codes(name):  # importing a command (torch, transformers) can fail or be interrupted too
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    return None
                raise
        command = getattr(module, name.replace("-", "_"))
        command.short_help = short_help
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from ``COMMANDS`` so ``seftkit --help`` imports no command module (so no torch)."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="seftkit")
@click.option("--debug", is_flag=True, help=f"Print the traceback of an internal error (or set {DEBUG_ENV}=1).")
def cli(debug: bool) -> None:
    """seftkit: prune, repair (SEFT), verify, benchmark and export sparse LLMs.

    Models are Hugging Face folders (safetensors) or the built-in offline model `smollm2-135m`.
    Every command takes -q/--quiet, -v/--verbose and --progress/--no-progress; results go to stdout,
    logs and progress bars to stderr.

    \b
    Exit codes: 0 ok, 1 check failed (verify only), 2 bad input, 3 internal error, 130 interrupted.
    """


def main() -> None:
    cli(prog_name="seftkit")


if __name__ == "__main__":
    main()
