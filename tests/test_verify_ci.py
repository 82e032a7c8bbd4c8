"""docs/ci.md's light install is enough: verify runs with only the packages that page installs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "ci.md"


def documented_packages() -> list[str]:
    """Top-level modules of the `pip install "click>=8.1" "numpy>=1.24"` line of the light install."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("python -m pip install \"")]
    assert len(lines) == 1, lines
    return [re.split(r"[<>=!~ ]", spec)[0] for spec in re.findall(r'"([^"]+)"', lines[0])]


def run_with_only(allowed: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI where every third-party import other than ``allowed`` (and seftkit) fails."""
    code = (
        "import sys\n"
        f"allowed = set(sys.stdlib_module_names) | {{'seftkit', *{allowed!r}}}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] not in allowed:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from seftkit.cli.main import main\n"
        f"sys.argv = ['seftkit', *{args!r}]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_documented_light_install_runs_verify(llama_dir, tmp_path):
    assert documented_packages() == ["click", "numpy"]
    result = run_with_only(documented_packages(), ["verify", str(llama_dir), "--sparsity", "0.5", "--json",
                                                   str(tmp_path / "r.json")])
    assert result.returncode == 1, result.stderr  # a dense model is short: exit 1, not an import failure
    assert "FAIL: 14 of 14 weights" in result.stdout and result.stderr == ""
    assert (tmp_path / "r.json").is_file()
    missing = run_with_only(documented_packages(), ["verify", str(tmp_path / "nope")])
    assert (missing.returncode, missing.stderr.count("\n")) == (2, 1)


def test_other_commands_name_what_the_light_install_lacks(llama_dir):
    result = run_with_only(documented_packages(), ["prune", str(llama_dir), "--method", "magnitude",
                                                   "--sparsity", "0.5"])
    assert result.returncode == 2
    assert result.stderr.startswith("seftkit: error: prune needs the Python package ") and \
        result.stderr.count("\n") == 1, result.stderr


def test_verify_plot_without_matplotlib_is_refused_in_one_line(llama_dir, tmp_path):
    result = run_with_only(documented_packages(), ["verify", str(llama_dir), "--plot", str(tmp_path / "v.png")])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == 'seftkit: error: drawing needs matplotlib: pip install "seftkit[plot]" (or pip install ' \
                            'matplotlib)\n'
