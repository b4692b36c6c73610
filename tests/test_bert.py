"""aifn.bert, the plain-torch runtime: transformers' answers without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aifn import bert, model_source
from aifn.model import BUILD_INFO, TextClassifier, TextEncoder

from .test_faults import _edit_config, _link_model

REPO = Path(__file__).resolve().parents[1]
CLASSIFY_MODEL = REPO / "models" / "classify"

# What the tokenizer has to agree on: case, accents, CJK, emoji, invisible and control characters,
# URLs, numbers, runs of spaces, and texts long enough to be truncated (at 64 tokens below).
TEXTS = [
    "I love this, it works perfectly!",
    "Terrible. It broke after a day :(",
    "Meh.",
    "Café naïve résumé — ÉLAN, Ünïcödé, straße, İstanbul",
    "漢字とかな混じりの文 and English 😀👍🏽",
    "zero\u200bwidth\u00adsoft hyphen\ttab\r\nnew line \x07 bell",
    "https://example.com/path?q=1&x=%20 email: someone@example.com #hashtag @handle",
    "Order #12345 cost $1,299.99 on 2026-11-27, 3x faster than v2.0",
    "   lots     of      spaces   ",
    "The hotel room was clean and quiet, the breakfast was average and the staff were "
    "friendly, but the wifi kept dropping every evening. " * 6,
    "word " * 62,  # with [CLS] and [SEP], exactly the limit: not truncated
    "word " * 63,  # one token past it
    "a",
]


def _pair(cls: type, path: Path, quantize: str) -> tuple[object, object]:
    def load(runtime: str) -> object:
        return cls.load(
            path, max_tokens=64, batch_size=8, threads=1, quantize=quantize, runtime=runtime
        )

    return load("auto"), load("transformers")


def _batches(quantize: str) -> list[list[str]]:
    """float32: all the texts at once. int8: one at a time, since a batch's int8 input scales
    differ by design (aifn.bert leaves the padding out of them): the int8 path is held to
    the card's accuracy instead, below."""
    return [TEXTS] if quantize == "off" else [[t] for t in TEXTS]


@pytest.mark.parametrize("quantize", ["off", "auto"])
def test_the_classifier_scores_as_transformers_does(
    sentiment_model_dir: Path, quantize: str
) -> None:
    ours, reference = _pair(TextClassifier, sentiment_model_dir, quantize)
    assert (ours.runtime, reference.runtime) == ("aifn.bert", "transformers")
    assert type(ours.module).__module__ == "aifn.bert"
    assert ours.identity == reference.identity

    for batch in _batches(quantize):
        got, got_cut = ours.probabilities(batch)
        want, want_cut = reference.probabilities(batch)
        assert got_cut == want_cut
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-6), batch
    _, truncated = ours.probabilities(TEXTS)
    assert truncated[-3:] == [False, True, False]  # 62 words fit, 63 do not


@pytest.mark.parametrize("quantize", ["off", "auto"])
def test_the_encoder_embeds_as_transformers_does(quantize: str) -> None:
    ours, reference = _pair(TextEncoder, CLASSIFY_MODEL, quantize)
    assert (ours.runtime, reference.runtime) == ("aifn.bert", "transformers")
    for batch in _batches(quantize):
        got, got_cut = ours.embed(batch)
        want, want_cut = reference.embed(batch)
        assert got_cut == want_cut
        assert torch.allclose(got, want, rtol=0, atol=1e-6), batch


@pytest.mark.slow  # the full held-out set, twice
def test_int8_accuracy_on_the_served_path_is_within_the_cards_tolerance(
    sentiment_model_dir: Path,
) -> None:
    """The card's int8 decision was measured through transformers, batches padded; serving runs
    aifn.bert, whose int8 input scales leave the padding out. The 0.5-point rule must hold on
    the path that serves, and float32 must reproduce the card's figure exactly."""
    recipe = model_source.load_recipe(REPO / "functions" / "sentiment" / "recipe.py")
    held_out = [r for r in recipe.load_ratings(recipe.fetch_sdist()) if r.held_out]
    card = json.loads((sentiment_model_dir / BUILD_INFO).read_text(encoding="utf-8"))["metrics"]
    metric = card["quantization"]["metric"]
    figures = {}
    for quantize in ("off", "auto"):
        served = TextClassifier.load(
            sentiment_model_dir,
            max_tokens=recipe.CONFIG.max_length,
            batch_size=64,
            threads=2,
            quantize=quantize,
        )
        assert served.runtime == "aifn.bert"
        figures[quantize] = recipe.evaluate(served.module, served._tokenizer, held_out)[metric]
    assert figures["off"] == pytest.approx(card["quantization"]["float32"][metric], abs=1e-9)
    tolerance = card["quantization"]["tolerance_points"] / 100
    assert figures["auto"] >= figures["off"] - tolerance, figures


def test_the_tokenizer_matches_transformers_token_for_token(sentiment_model_dir: Path) -> None:
    ours, reference = _pair(TextClassifier, sentiment_model_dir, "off")
    # One text at a time and all together (padding), so both widths and pads are compared.
    for batch in [[t] for t in TEXTS] + [TEXTS]:
        got, got_cut = ours._tokenizer.model_inputs(batch)
        want, want_cut = reference._tokenizer.model_inputs(batch)
        assert got_cut == want_cut, batch
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (name, batch)


def test_serving_never_imports_transformers(sentiment_model_dir: Path) -> None:
    """The point of the runtime: a cold start without transformers (nor torch's compiler)."""
    script = (
        "import sys; from pathlib import Path; from aifn.model import load_model, CLASSIFIER, "
        "ENCODER\n"
        "for path in sys.argv[1:]:\n"
        "    m = load_model(Path(path), max_tokens=64, batch_size=8, threads=1, "
        "kinds=(CLASSIFIER, ENCODER), quantize='auto')\n"
        "    assert m.runtime == 'aifn.bert', m.runtime\n"
        "print(sorted({n.split('.')[0] for n in sys.modules if n.startswith(('transformers', "
        "'torch._dynamo', 'sympy'))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(sentiment_model_dir), str(CLASSIFY_MODEL)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert out.strip() == "[]", out


def test_a_model_it_cannot_run_is_served_by_transformers(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    path = _link_model(sentiment_model_dir, tmp_path / "relu", without=("config.json",))
    _edit_config(path, sentiment_model_dir, hidden_act="relu")
    model = TextClassifier.load(path, max_tokens=64, batch_size=8, threads=1)
    assert model.runtime == "transformers"
    assert model.predict(["I love it"])[0].label in model.labels


@pytest.mark.parametrize(
    ("changes", "classifier", "reason"),
    [
        ({}, True, None),
        ({"architectures": ["BertModel"]}, False, None),
        ({"architectures": None}, False, None),
        ({"model_type": "roberta"}, True, "model_type 'roberta'"),
        ({"hidden_act": "gelu_new"}, True, "hidden_act 'gelu_new'"),
        ({"position_embedding_type": "relative_key"}, True, "position_embedding_type"),
        ({"is_decoder": True}, True, "a decoder"),
        ({"architectures": ["BertForMaskedLM"]}, False, "architectures ['BertForMaskedLM']"),
        ({"architectures": ["BertModel"]}, True, "architectures ['BertModel']"),
    ],
)
def test_which_models_it_runs(
    sentiment_model_dir: Path,
    changes: dict[str, object],
    classifier: bool,
    reason: str | None,
) -> None:
    config = json.loads((sentiment_model_dir / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    why = bert.unsupported(config, sentiment_model_dir, classifier=classifier)
    assert why == reason if reason is None else reason in (why or "")


def test_without_tokenizer_json_it_is_not_used(sentiment_model_dir: Path, tmp_path: Path) -> None:
    config = json.loads((sentiment_model_dir / "config.json").read_text(encoding="utf-8"))
    assert bert.unsupported(config, tmp_path, classifier=True) == "no tokenizer.json"
