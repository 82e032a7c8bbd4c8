"""The exit-code contract CI relies on, in every command: 0 ok, 1 verify short, 2 bad input, 3 internal error
(one line, no traceback unless asked), 130 interrupted."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from click.testing import CliRunner

from seftkit.cli.main import COMMANDS, cli
from seftkit.errors import SeftkitError

AVAILABLE = [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]

# command -> (the API function it calls, arguments that get that far). A new command needs a line here.
PROVOKE = {
    "prune": ("seftkit.prune.prune_checkpoint", ["m", "--method", "magnitude", "--sparsity", "0.5"]),
    "repair": ("seftkit.repair.repair_checkpoint", ["m"]),
    "verify": ("seftkit.cli.verify.verify_model", ["m"]),
    "bench": ("seftkit.bench.layers.bench_layers", ["--sparsity", "0.5", "--batch", "1"]),
    "export": ("seftkit.exporters.export_model", ["m", "--format", "csr", "--out", "{tmp}/out"]),
    "eval": ("seftkit.eval.evaluate_model", ["m"]),
    "plot": ("seftkit.plot.plot_report", ["{tmp}/r.json"]),
    "generate": ("seftkit.generation.generate", ["m", "--prompt", "hi"]),
}


def test_every_command_is_covered():
    assert sorted(AVAILABLE) == sorted(PROVOKE), "add each new command to PROVOKE"


def invoke(monkeypatch, tmp_path, name: str, raises: BaseException, *group_args: str):
    def fail(*_, **__):
        raise raises

    monkeypatch.setattr(PROVOKE[name][0], fail)
    return invoke_patched(tmp_path, name, *group_args)


@pytest.mark.parametrize("name", sorted(PROVOKE))
def test_internal_error_is_exit_3_and_one_line(name, monkeypatch, tmp_path):
    monkeypatch.delenv("SEFTKIT_DEBUG", raising=False)
    result = invoke(monkeypatch, tmp_path, name, RuntimeError("boom\nsecond line"))
    assert (result.exit_code, result.stdout) == (3, ""), result.output
    assert result.stderr == (f"seftkit: internal error in {name}: RuntimeError: boom (rerun with --debug or "
                             "SEFTKIT_DEBUG=1 for the traceback)\n")


@pytest.mark.parametrize("name", sorted(PROVOKE))
def test_debug_shows_the_traceback(name, monkeypatch, tmp_path):
    monkeypatch.delenv("SEFTKIT_DEBUG", raising=False)
    result = invoke(monkeypatch, tmp_path, name, RuntimeError("boom"), "--debug")
    assert result.exit_code == 3
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "raise raises" in result.stderr  # the frame that failed
    assert result.stderr.splitlines()[-1] == f"seftkit: internal error in {name}: RuntimeError: boom (the traceback " \
                                              "is above)"


@pytest.mark.parametrize(("raises", "code", "stderr"), [
    (SeftkitError("bad model\nmore"), 2, "seftkit: error: bad model\n"),
    (KeyboardInterrupt(), 130, "seftkit: interrupted; no output folder was written (a repair's <out>.ckpt is kept "
                               "for --resume)\n"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2,
     "seftkit: error: out of device memory; try a smaller --batch-size, --seqlen or --nsamples\n"),
])
@pytest.mark.parametrize("name", sorted(PROVOKE))
def test_bad_input_and_interrupt(name, raises, code, stderr, monkeypatch, tmp_path):
    result = invoke(monkeypatch, tmp_path, name, raises)
    assert (result.exit_code, result.stderr, result.stdout) == (code, stderr, "")


def test_env_debug_turns_tracebacks_on(monkeypatch, tmp_path):
    monkeypatch.setenv("SEFTKIT_DEBUG", "1")
    result = invoke(monkeypatch, tmp_path, "verify", RuntimeError("boom"))
    assert result.exit_code == 3 and "Traceback (most recent call last):" in result.stderr
    monkeypatch.setenv("SEFTKIT_DEBUG", "0")
    result = invoke(monkeypatch, tmp_path, "verify", RuntimeError("boom"))
    assert result.exit_code == 3 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["verify"], ["verify", "m", "--no-such-option"], ["prune", "m"],
                                  ["verify", "m", "--tol", "lots"]])
def test_usage_errors_are_exit_2(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output


def test_a_command_that_fails_to_import_is_an_internal_error(monkeypatch, tmp_path):
    (tmp_path / "seftkit_broken_command.py").write_text("raise RuntimeError('cannot load')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "broken", ("seftkit_broken_command", "never loads"))
    monkeypatch.delenv("SEFTKIT_DEBUG", raising=False)
    result = CliRunner().invoke(cli, ["broken"])
    assert (result.exit_code, result.stderr) == (3, "seftkit: internal error in broken: RuntimeError: cannot load "
                                                     "(rerun with --debug or SEFTKIT_DEBUG=1 for the traceback)\n")
    sys.modules.pop("seftkit_broken_command", None)


def test_verify_short_is_exit_1_and_ok_is_0(llama_dir):
    short = CliRunner().invoke(cli, ["verify", str(llama_dir), "--sparsity", "0.5"])  # a dense model
    assert short.exit_code == 1 and "FAIL: 14 of 14 weights" in short.stdout
    measured = CliRunner().invoke(cli, ["verify", str(llama_dir)])
    assert measured.exit_code == 0 and "measured only" in measured.stdout


def test_a_missing_dependency_is_bad_setup_not_a_bug(monkeypatch, tmp_path):
    """The light install (click + numpy) has no torch: prune says what is missing, exit 2."""
    monkeypatch.setattr(PROVOKE["prune"][0], lambda *_, **__: __import__("torch_that_is_not_installed"))
    result = invoke_patched(tmp_path, "prune")
    assert (result.exit_code, result.stderr) == (2, "seftkit: error: prune needs the Python package "
                                                    "torch_that_is_not_installed, which is not installed (the light "
                                                    "install of seftkit runs only verify; install seftkit with its "
                                                    "dependencies)\n")
    monkeypatch.setattr(PROVOKE["prune"][0], lambda *_, **__: __import__("seftkit.no_such_module"))
    assert invoke_patched(tmp_path, "prune").exit_code == 3  # seftkit's own module missing is a bug


def invoke_patched(tmp_path, name: str, *group_args: str):
    (tmp_path / "r.json").write_text("{}")
    return CliRunner().invoke(cli, [*group_args, name, *(a.format(tmp=tmp_path) for a in PROVOKE[name][1])])
