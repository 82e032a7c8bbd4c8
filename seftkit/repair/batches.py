"""Training micro-batches for repair, in a fixed, seeded order.

Micro-batch ``i`` is a pure function of (data, tokenizer, seed, ``i``): every method sees the same tokens in the
same order, and resuming a run needs only the index of the next micro-batch, not a saved iterator. A distributed
run builds the same global micro-batches and each rank keeps its ``rows`` (padded to the global width), so every
window is trained on exactly once per pass over the data, by one rank.

Two kinds of data:
- plain text (default ``olmo:lambada:train``): ``seqlen`` token windows drawn with the run seed, loss on
  every token;
- multiple-choice tasks (``olmo:piqa``, ``olmo:boolq+piqa``, ``olmo:commonsense8`` ...): each task's ``train``
  split (or its ``fit`` part, ``olmo:piqa:fit``) as instruction/answer pairs, loss only on the answer tokens, so
  the ``heldout`` questions that evaluation uses are never trained on. ``max_per_task`` keeps a seeded sample of
  each task's questions (one large task would otherwise dominate a mix); the tasks' examples are pooled and
  every pass over them is a seeded permutation, so the tasks interleave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from seftkit.data import load_texts, parse_task_data, token_windows, training_tasks
from seftkit.errors import SeftkitError

if TYPE_CHECKING:
    from seftkit.eval.tasks import MCItem

IGNORE_INDEX = -100  # label value the causal LM loss skips (prompt and padding tokens)


@dataclass
class Example:
    input_ids: torch.Tensor  # 1-D long
    labels: torch.Tensor  # 1-D long, IGNORE_INDEX where no loss is taken


class TrainBatches:
    """Seeded micro-batches cycling over a list of examples (a fresh permutation per pass)."""

    def __init__(self, examples: list[Example], batch_size: int, pad_token_id: int, seed: int,
                 rows: slice | None = None) -> None:
        if not examples:
            raise SeftkitError("the training data produced no examples")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.rows = rows or slice(None)  # this rank's rows of every micro-batch
        self._orders: dict[int, list[int]] = {}

    def _example(self, position: int) -> Example:
        epoch, offset = divmod(position, len(self.examples))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self.examples), generator=generator).tolist()
        return self.examples[self._orders[epoch][offset]]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` of micro-batch ``index`` (this rank's rows),
        right-padded."""
        rows = [self._example(index * self.batch_size + j) for j in range(self.batch_size)]
        width = max(row.input_ids.numel() for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = row.input_ids.numel()
            input_ids[i, :n] = row.input_ids
            labels[i, :n] = row.labels
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {key: value[self.rows] for key, value in batch.items()}


def is_task_data(spec: str) -> bool:
    """``olmo:<task>[+<task>...][:split]`` or a mix names multiple-choice tasks; anything else is text."""
    return parse_task_data(spec) is not None


def text_examples(tokenizer: Any, spec: str, seqlen: int, count: int, seed: int) -> list[Example]:
    """``count`` seeded windows of ``seqlen`` tokens; the loss covers every token."""
    windows = token_windows(tokenizer, load_texts(spec), seqlen, nsamples=count, seed=seed, random=True)
    return [Example(input_ids=w, labels=w.clone()) for w in windows]


def training_items(task: str, split: str = "train", limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """The questions of ``task``'s ``split`` that are safe to train on, and a ``seed``-ed random sample of
    ``limit`` of them (in their original order) when there are more.

    The splits are keyed by whole rows, and some rows repeat another's prompt (the text before the options):
    PIQA goals and HellaSwag contexts with other options, Winogrande twins (the same sentence up to the blank,
    the opposite answer), one Social IQa row twice. A question whose prompt also appears in ``heldout`` (and in
    ``val`` when training on ``fit``) is left out, so nothing that is scored is ever trained on.
    """
    from seftkit.eval.tasks import load_task

    scored = {item.context for item in load_task(task, split="heldout")}
    if split == "fit":
        scored |= {item.context for item in load_task(task, split="val")}
    items = [item for item in load_task(task, split=split) if item.context not in scored]
    if limit is not None and limit < len(items):
        generator = torch.Generator().manual_seed(seed)
        items = [items[i] for i in sorted(torch.randperm(len(items), generator=generator)[:limit].tolist())]
    return items


def task_examples(tokenizer: Any, items: list[MCItem], seqlen: int) -> list[Example]:
    """Questions as prompt + correct answer (+ EOS); loss only on the answer and EOS.

    Prompt and answer are tokenized separately and joined, so the label boundary is exact; rows longer than
    ``seqlen`` lose the start of their prompt, never the answer.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for item in items:
        prompt = tokenizer(item.contexts[item.gold], add_special_tokens=False).input_ids
        answer = tokenizer(item.continuations[item.gold], add_special_tokens=False).input_ids + eos
        ids = torch.tensor(prompt + answer, dtype=torch.long)[-seqlen:]
        labels = ids.clone()
        labels[: max(ids.numel() - len(answer), 0)] = IGNORE_INDEX
        examples.append(Example(input_ids=ids, labels=labels))
    return examples


def build_batches(tokenizer: Any, spec: str, seqlen: int, batch_size: int, micro_batches: int,
                  seed: int, rows: slice | None = None, max_per_task: int | None = None) -> TrainBatches:
    """The micro-batch source for a run that consumes ``micro_batches`` micro-batches of ``batch_size`` (global)
    rows, of which this process trains on ``rows`` (all by default); ``max_per_task`` caps each task's examples
    (task data only)."""
    if is_task_data(spec):
        tasks, split = training_tasks(spec)
        items = [item for task in tasks for item in training_items(task, split, max_per_task, seed)]
        examples = task_examples(tokenizer, items, seqlen)
    else:
        examples = text_examples(tokenizer, spec, seqlen, micro_batches * batch_size, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainBatches(examples, batch_size, int(pad or 0), seed, rows)
