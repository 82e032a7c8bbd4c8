"""The CLI shell: help, version, lazy commands and the shared one-line error handling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from seftkit import __version__
from seftkit.cli.common import handle_errors, json_option, write_report
from seftkit.cli.main import COMMANDS, cli
from seftkit.errors import SeftkitError

AVAILABLE = [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module)]


def test_help_lists_every_command_without_importing_them():
    code = (
        "import sys\n"
        "from seftkit.cli.main import main\n"
        "sys.argv = ['seftkit', '--help']\n"
        "try:\n    main()\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("Usage: seftkit [OPTIONS] COMMAND [ARGS]...")
    commands = out.split("Commands:")[1]
    assert "verify" in AVAILABLE
    for name in AVAILABLE:
        assert f"  {name} " in commands, name
    assert out.strip().splitlines()[-1] == "[]"  # help imported neither torch nor transformers


@pytest.mark.parametrize("name", AVAILABLE)
def test_each_command_has_help_and_the_shared_options(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: cli {name} [OPTIONS]")
    for option in ("-q, --quiet", "-v, --verbose", "--progress / --no-progress"):
        assert option in result.stdout, (name, option)
    assert "--json" in result.stdout or name == "plot"  # plot writes a picture, not a report


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"seftkit, version {__version__}\n")


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command 'frobnicate'" in result.stderr


@click.command()
@click.argument("what")
@json_option
@handle_errors
def demo(what: str, json_path: str | None) -> None:
    if what == "bad":
        raise SeftkitError("the input was bad\nsecond line is dropped")
    if what == "interrupt":
        raise KeyboardInterrupt
    if what == "memory":
        raise MemoryError
    if what == "bug":
        raise ZeroDivisionError("a real bug")
    click.echo("ok")
    write_report(json_path, {"what": what})


@pytest.mark.parametrize(("what", "code", "stderr"), [
    ("bad", 2, "seftkit: error: the input was bad\n"),
    ("interrupt", 130, "seftkit: interrupted; no output folder was written (a repair's <out>.ckpt is kept for "
                       "--resume)\n"),
    ("memory", 2, "seftkit: error: out of memory; try a smaller --batch-size, --seqlen or --nsamples\n"),
])
def test_handle_errors_one_line(what, code, stderr):
    result = CliRunner().invoke(demo, [what])
    assert (result.exit_code, result.stderr, result.stdout) == (code, stderr, "")


def test_a_bug_is_one_line_and_exit_3_with_the_traceback_on_request(monkeypatch):
    monkeypatch.delenv("SEFTKIT_DEBUG", raising=False)
    result = CliRunner().invoke(demo, ["bug"])
    assert (result.exit_code, result.stdout) == (3, "")
    assert result.stderr == ("seftkit: internal error in demo: ZeroDivisionError: a real bug (rerun with --debug or "
                             "SEFTKIT_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("SEFTKIT_DEBUG", "1")
    result = CliRunner().invoke(demo, ["bug"])
    assert result.exit_code == 3
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert 'raise ZeroDivisionError("a real bug")' in result.stderr
    assert result.stderr.splitlines()[-1].endswith("ZeroDivisionError: a real bug (the traceback is above)")


def test_json_option_writes_report(tmp_path):
    result = CliRunner().invoke(demo, ["fine", "--json", str(tmp_path / "out" / "r.json")])
    assert (result.exit_code, result.stdout) == (0, "ok\n")
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"what": "fine"}
