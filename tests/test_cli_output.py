"""Output hygiene: results on stdout; logs and progress bars on stderr, at the level -q/-v ask, and bars only
on a terminal unless --progress."""

from __future__ import annotations

import logging

import click
import pytest
from click.testing import CliRunner
from tqdm import tqdm

from seftkit.cli.common import handle_errors, show_progress
from seftkit.cli.main import cli

log = logging.getLogger("seftkit.test")


@click.command()
@handle_errors
def chatty() -> None:
    log.debug("debug detail")
    log.info("info note")
    log.warning("warning sign")
    for _ in tqdm(range(3), desc="working", disable=not show_progress()):
        pass
    click.echo("the result")


@pytest.mark.parametrize(("args", "stderr_lines"), [
    ([], ["info note", "warning sign"]),
    (["-q"], ["warning sign"]),
    (["--quiet"], ["warning sign"]),
    (["-v"], ["debug detail", "info note", "warning sign"]),
])
def test_log_level_follows_quiet_and_verbose(args, stderr_lines):
    result = CliRunner().invoke(chatty, args)
    assert result.exit_code == 0
    assert result.stdout == "the result\n"
    assert result.stderr.splitlines() == stderr_lines  # and no progress bar: stderr is not a terminal here


@pytest.mark.parametrize(("args", "bar"), [
    ([], False), (["--progress"], True), (["-q", "--progress"], True), (["--no-progress"], False),
])
def test_progress_bar_only_when_asked_off_a_terminal(args, bar):
    result = CliRunner().invoke(chatty, args)
    assert result.stdout == "the result\n"
    assert ("working: 100%" in result.stderr) == bar


def test_progress_defaults_to_whether_stderr_is_a_terminal(monkeypatch):
    seen = []

    @click.command()
    @handle_errors
    def probe() -> None:
        seen.append(show_progress())

    class Terminal:
        def __init__(self, tty: bool):
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    for tty, args, expected in [(True, [], True), (False, [], False), (True, ["-q"], False),
                                (True, ["--no-progress"], False), (False, ["--progress"], True)]:
        monkeypatch.setattr("sys.stderr", Terminal(tty))
        probe.main(args, standalone_mode=False)
        assert seen.pop() is expected, (tty, args)


def test_verify_results_on_stdout_bar_on_stderr_only_when_asked(llama_dir):
    plain = CliRunner().invoke(cli, ["verify", str(llama_dir)])
    assert plain.exit_code == 0 and plain.stderr == ""
    assert plain.stdout.startswith(f"model: {llama_dir} (llama, 1 file(s), 14 targeted weights)\n")
    shown = CliRunner().invoke(cli, ["verify", str(llama_dir), "--progress"])
    assert shown.stdout == plain.stdout
    assert "verify" in shown.stderr and "B/s" in shown.stderr


def test_prune_bar_follows_progress(llama_dir, tiny_text_file, tmp_path):
    args = ["prune", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(tiny_text_file),
            "--nsamples", "2", "--seqlen", "16"]
    quiet = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.startswith(f"pruned {llama_dir} with wanda to 50% unstructured")
    shown = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--progress"])
    assert shown.exit_code == 0 and "prune blocks: 100%" in shown.stderr
    assert "prune blocks" not in shown.stdout
