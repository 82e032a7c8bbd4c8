"""``seftkit repair``: recover the quality a pruned model lost without giving up its sparsity.

:func:`repair_model` repairs a loaded model in place with SEFT or a baseline (one training loop for all, see
:mod:`seftkit.repair.trainer`); :func:`repair_checkpoint` is load -> repair -> save for the CLI, writing an
ordinary HF folder with ``seft_report.json`` only when the whole run succeeded.

Both run as they are under ``torchrun --nproc-per-node N`` (or ``accelerate launch``): see
:mod:`seftkit.repair.trainer` for how the work is shared; only rank 0 writes checkpoints and the output.
"""

from __future__ import annotations

import os

from seftkit.repair.checkpoint import checkpoint_dir_for
from seftkit.repair.config import RepairConfig
from seftkit.repair.registry import REPAIR_METHODS, build_method
from seftkit.repair.report import REPORT_NAME, RepairReport
from seftkit.repair.trainer import repair_model


def repair_checkpoint(
    model_spec: str | os.PathLike,
    config: RepairConfig,
    out: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> RepairReport:
    """Load -> repair -> save ``out`` atomically; checkpoints go to ``<out>.ckpt`` (removed after success).

    Everything cheap is checked before the model loads (options, method name, output path), and the input
    folder is only ever read. ``stop_after`` ends the run after that many steps, leaving only the checkpoint
    (as a kill would), which ``resume`` continues from.
    """
    import shutil

    from seftkit.distributed import barrier, init_distributed
    from seftkit.io import atomic_dir, check_output_path, write_json
    from seftkit.models import choose_dtype, load_model, resolve_device, resolve_dtype, resolve_model_path, save_model
    from seftkit.repair.sharding import full_state_dict, uses_fsdp

    config.validate()
    method = build_method(config)  # before the model loads: which dtype it trains in
    out_path = check_output_path(out, overwrite, inputs=(model_spec,))
    out_dtype = choose_dtype(resolve_model_path(model_spec), config.dtype)
    ckpt = checkpoint_dir_for(out_path) if config.checkpoint_every or resume else None
    ranks, device = init_distributed(resolve_device(config.device))
    sharded = uses_fsdp(config.strategy)  # then the model loads into CPU memory and only shards go to the device
    load_dtype = "fp32" if method.trains_base_weights else out_dtype
    model, tokenizer = load_model(model_spec, device="cpu" if sharded else device, dtype=load_dtype)
    report = repair_model(model, tokenizer, config, checkpoint_dir=ckpt, resume=resume, progress=progress,
                          stop_after=stop_after)
    if report.sparsity_after is None:  # stopped early on purpose: the checkpoint is the result
        return report
    report.output = str(out_path)
    model.to(resolve_dtype(out_dtype))
    state = full_state_dict(model) if sharded else None  # gathered onto rank 0's CPU
    if ranks.is_main:
        with atomic_dir(out_path, overwrite) as tmp:
            save_model(model, tokenizer, tmp, state_dict=state)
            write_json(tmp / REPORT_NAME, report)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    barrier()  # every rank returns once the output exists
    return report


__all__ = ["REPAIR_METHODS", "REPORT_NAME", "RepairConfig", "RepairReport", "checkpoint_dir_for",
           "repair_checkpoint", "repair_model"]
