"""``seftkit generate``: text from a sparse model on the native kernels, with prefill and decode speeds."""

from __future__ import annotations

import click

from seftkit.cli.common import device_option, handle_errors, json_option, write_report


@click.command()
@click.argument("model")
@click.option("--prompt", required=True, help="The user message (put through the model's chat template).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Most tokens to generate.")
@click.option("--backend", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="auto: sparse kernels where they stream fewer bytes; sparse: the same, failing if no layer is "
                   "sparse; dense: plain transformers (the comparison).")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="With --sample.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="With --sample: nucleus mass kept.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample.")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text even if a template exists.")
@click.option("--dtype", default="auto", show_default=True, help="auto (as stored), fp32, bf16 or fp16.")
@device_option
@json_option
@handle_errors
def generate(model: str, prompt: str, max_new_tokens: int, backend: str, threads: int | None, sample: bool,
             temperature: float, top_p: float, seed: int, no_chat_template: bool, dtype: str, device: str,
             json_path: str | None) -> None:
    """Generate text from MODEL (HF folder or built-in name); the text goes to stdout, speeds to stderr."""
    from seftkit.generation import GenerateConfig
    from seftkit.generation import generate as run

    config = GenerateConfig(max_new_tokens=max_new_tokens, backend=backend, threads=threads, sample=sample,
                            temperature=temperature, top_p=top_p, seed=seed, chat_template=not no_chat_template,
                            dtype=dtype, device=device)
    report = run(model, prompt, config=config)
    click.echo(report.text)
    click.echo(f"{report.backend}: {report.sparse_layers}/{report.target_layers} linears on sparse kernels, "
               f"{report.dtype}, {report.threads} thread(s); prefill {report.prompt_tokens} tokens at "
               f"{report.prefill_tokens_per_s:.1f} tok/s, decode {report.new_tokens} tokens at "
               f"{report.decode_tokens_per_s:.1f} tok/s", err=True)
    write_report(json_path, report)
