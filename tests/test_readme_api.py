"""The README's Python API example runs as written, on a tiny model.

The ```python block under the README's "## Python API" heading is executed as written, with three things made
small underneath it: a built-in model name (the example's default model) resolves to a tiny random Llama folder
instead of the converted checkpoint, the built-in LAMBADA text (``olmo:lambada[:train|:heldout]``) holds only its
first passages, and ``repair_model`` runs at most ``MAX_STEPS`` of the configured steps. The example's own calls,
other settings and final ``assert`` run unchanged, in seconds.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model

import seftkit.repair
from seftkit import data, models

README = Path(__file__).resolve().parent.parent / "README.md"
LAMBADA_PASSAGES = 120  # split by seftkit into train and heldout as the full set is
MAX_STEPS = 4


def readme_api_example() -> str:
    text = README.read_text()
    section = re.search(r"^## Python API[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        pytest.fail("README.md has no '## Python API' section: the API example this test runs is gone")
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    if block is None:
        pytest.fail("README.md's '## Python API' section has no ```python block to run")
    return block.group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    tiny = save_tiny_model(tmp_path / "tiny", "llama")
    resolve = models.resolve_model_path
    asked: list[str] = []

    def tiny_for_builtins(spec, *args, **kwargs):
        if str(spec) in models.builtin_names():
            asked.append(str(spec))
            spec = tiny
        return resolve(spec, *args, **kwargs)

    monkeypatch.setattr(models, "resolve_model_path", tiny_for_builtins)
    passages = data.lambada_passages()[:LAMBADA_PASSAGES]
    monkeypatch.setattr(data, "lambada_passages", lambda: passages)
    repair, repaired = seftkit.repair.repair_model, []

    def fewer_steps(model, tokenizer, config, *args, **kwargs):
        repaired.append(config.method)
        return repair(model, tokenizer, dataclasses.replace(config, steps=min(config.steps, MAX_STEPS)), *args,
                      **kwargs)

    monkeypatch.setattr(seftkit.repair, "repair_model", fewer_steps)
    monkeypatch.chdir(tmp_path)  # the example writes its output folder relative to the working directory
    code = readme_api_example()
    exec(compile(code, f"{README}:Python API", "exec"), {"__name__": "readme_example"})
    assert asked, "the example no longer loads a built-in model; update this test's substitution"
    assert repaired, "the example no longer calls seftkit.repair_model; update this test's substitution"


@pytest.mark.parametrize(("readme", "message"), [
    ("# seftkit\n\n## Install\n\n```python\nimport seftkit\n```\n", "has no '## Python API' section"),
    ("## Python API\n\nSee the docs.\n\n## Results\n\n```python\nimport seftkit\n```\n", "has no ```python block"),
])
def test_a_readme_without_the_example_fails_this_test(readme, message, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(readme)
    with pytest.raises(pytest.fail.Exception, match=message):
        readme_api_example()
