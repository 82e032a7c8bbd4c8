"""Pictures: repair draws r.png beside r.json, verify --plot, seftkit plot redraws; matplotlib stays optional."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from seftkit.cli.main import cli
from seftkit.plot import DPI, REPAIR_SIZE, VERIFY_SIZE, png_beside
from seftkit.prune import prune_checkpoint
from seftkit.sparsity.pattern import parse_pattern

REPAIR_PIXELS = (round(REPAIR_SIZE[0] * DPI), round(REPAIR_SIZE[1] * DPI))
VERIFY_PIXELS = (round(VERIFY_SIZE[0] * DPI), round(VERIFY_SIZE[1] * DPI))
MISSING = 'seftkit: error: drawing needs matplotlib: pip install "seftkit[plot]" (or pip install matplotlib)\n'


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature and chunk type."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND"  # complete, not truncated
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pruned_dir(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "llama-50"
    prune_checkpoint(llama_dir, "magnitude", parse_pattern(0.5), out=out, progress=False)
    return out


def repair(pruned_dir: Path, data: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, [
        "repair", str(pruned_dir), "--data", str(data), "--steps", "6", "--batch-size", "2", "--seqlen", "32",
        "--lr", "1e-2", "--lora-rank-equivalent", "2", "--update-interval", "2", "--accumulation-steps", "1",
        "--out", str(out), *extra])


@pytest.fixture(scope="module")
def repair_json(pruned_dir, tiny_text_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("repair")
    result = repair(pruned_dir, tiny_text_file, tmp / "out", "--json", str(tmp / "r.json"))
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp / 'r.png'}" in result.stdout
    return tmp / "r.json"


def test_repair_draws_a_png_beside_its_json(repair_json):
    assert png_size(repair_json.with_suffix(".png")) == REPAIR_PIXELS
    report = json.loads(repair_json.read_text())
    assert [event["step"] for event in report["events"]] == [1, 3]  # the picture has boundaries to show
    revived = report["method_summary"]["layers"]
    assert len(revived) == 14 and sum(e["revived"] for e in revived.values()) == \
        report["method_summary"]["revived_weights"]


def test_plot_redraws_a_repair_report(repair_json, tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(repair_json), "--out", str(tmp_path / "x.png")])
    assert (result.exit_code, result.stdout) == (0, f"wrote {tmp_path / 'x.png'}\n")
    assert png_size(tmp_path / "x.png") == REPAIR_PIXELS
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_plot_draws_a_baseline_report_without_topology_updates(repair_json, tmp_path):
    report = json.loads(repair_json.read_text())
    report.update(method="static", events=[], method_summary={})
    (tmp_path / "static.json").write_text(json.dumps(report))
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "static.json")])  # default: beside the report
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "static.png") == REPAIR_PIXELS


def test_verify_plot_draws_per_layer_sparsity(pruned_dir, tmp_path):
    for args, code in ([["--sparsity", "0.5"], 0], [["--sparsity", "0.7"], 1], [["--nm", "2:4"], 1], [[], 0]):
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}.png"
        result = CliRunner().invoke(cli, ["verify", str(pruned_dir), *args, "--plot", str(out)])
        assert result.exit_code == code, result.output
        assert result.stdout.endswith(f"wrote {out}\n")
        assert png_size(out) == VERIFY_PIXELS
    result = CliRunner().invoke(cli, ["verify", str(pruned_dir), "--json", str(tmp_path / "v.json")])
    redrawn = CliRunner().invoke(cli, ["plot", str(tmp_path / "v.json")])
    assert redrawn.exit_code == 0 and png_size(tmp_path / "v.png") == VERIFY_PIXELS


@pytest.mark.parametrize(("content", "message"), [
    ('{"method": "magnitude", "tensors": []}', "can only draw repair and verify reports (--json of seftkit repair "
     "/ verify); this one has method, tensors"),
    ("not json", "is not a JSON file (JSONDecodeError)"),
    ('{"config": {}, "method": "seft", "loss_curve": [[0, "x"]]}', "malformed repair report: "),
])
def test_plot_refuses_other_files_in_one_line(content, message, tmp_path):
    (tmp_path / "r.json").write_text(content)
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("seftkit: error: ") and message in result.stderr, result.stderr
    assert not (tmp_path / "r.png").exists()


def test_plot_needs_a_png_name(repair_json, tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(repair_json), "--out", str(tmp_path / "x.jpg")])
    assert (result.exit_code, result.stderr) == (2, f"seftkit: error: {tmp_path / 'x.jpg'}: the picture is a PNG; "
                                                    "name it *.png\n")


def test_png_beside_never_replaces_the_report():
    assert png_beside("runs/r.json") == Path("runs/r.png")
    assert png_beside("runs/r") == Path("runs/r.png")
    assert png_beside("runs/r.png") == Path("runs/r.png.png")


def test_without_matplotlib_plot_is_one_line_and_repair_still_succeeds(monkeypatch, repair_json, pruned_dir,
                                                                       tiny_text_file, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the [plot] extra sees
    result = CliRunner().invoke(cli, ["plot", str(repair_json), "--out", str(tmp_path / "x.png")])
    assert (result.exit_code, result.stderr, result.stdout) == (2, MISSING, "")
    result = CliRunner().invoke(cli, ["verify", str(pruned_dir), "--plot", str(tmp_path / "v.png")])
    assert (result.exit_code, result.stderr, result.stdout) == (2, MISSING, "")  # refused before scanning
    result = repair(pruned_dir, tiny_text_file, tmp_path / "out", "--json", str(tmp_path / "r.json"), "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.json").is_file() and not (tmp_path / "r.png").exists()
    assert result.stderr == f"warning: no picture of {tmp_path / 'r.json'}: {MISSING.removeprefix('seftkit: error: ')}"
