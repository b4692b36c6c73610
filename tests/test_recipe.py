"""The sentiment recipe: labels, split, a short smoke training run, and the full model's figures.

The smoke run (`SMOKE`, 96 examples) exercises the whole recipe code path in about a minute
(most of it the held-out evaluation and the int8 plans); its accuracy means nothing. The
acceptance figures are checked on the full model that `make model` built (or restored from the
machine's prepared-model cache, which holds what the same recipe built from the same inputs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from aifn.build import finetune, model_source
from aifn.core.model import BUILD_INFO, TextClassifier

from .helpers import REPO

RECIPE_PATH = REPO / "functions" / "sentiment" / "recipe.py"


recipe = model_source.load_recipe(RECIPE_PATH)
SMOKE = dataclasses.replace(recipe.CONFIG, max_train_examples=96, batch_size=16, epochs=1)


@pytest.mark.parametrize(
    ("rating", "label"),
    [
        (-4, "NEGATIVE"),
        (-0.5, "NEGATIVE"),
        (-0.49, "NEUTRAL"),
        (0.0, "NEUTRAL"),
        (0.49, "NEUTRAL"),
        (0.5, "POSITIVE"),
        (3.2, "POSITIVE"),
    ],
)
def test_neutral_band(rating: float, label: str) -> None:
    assert recipe.label_for(rating) == label


@pytest.fixture(scope="module")
def ratings() -> list:
    return recipe.load_ratings(recipe.fetch_sdist())


def test_data_is_the_four_vader_sources(ratings: list) -> None:
    counts = {s: sum(r.source == s for r in ratings) for s in recipe.SOURCES}
    assert counts == {"movie": 10605, "tweet": 4200, "amazon": 3708, "nyt": 5190}
    assert all(-4 <= r.rating <= 4 for r in ratings)


def test_held_out_split_is_disjoint_stable_and_about_ten_percent(ratings: list) -> None:
    held = {(r.source, r.id) for r in ratings if r.held_out}
    assert 0.08 < len(held) / len(ratings) < 0.12
    again = {(r.source, r.id) for r in recipe.load_ratings(recipe.fetch_sdist()) if r.held_out}
    assert held == again
    # Every source is represented in the held-out set.
    assert {s for s, _ in held} == set(recipe.SOURCES)


def test_fingerprint_tracks_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe.fingerprint()
    assert before == recipe.fingerprint()
    monkeypatch.setattr(recipe, "CONFIG", dataclasses.replace(recipe.CONFIG, learning_rate=1e-5))
    assert recipe.fingerprint() != before


def test_length_grouped_batches_cover_every_example_once() -> None:
    import random

    lengths = [random.Random(1).randint(3, 90) for _ in range(1000)]
    batches = finetune._length_grouped_batches(lengths, 32, random.Random(7))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    # Grouping really reduces padding compared with random batches.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.3 * sum(lengths)


def test_macro_f1() -> None:
    assert finetune.macro_f1(["a", "b"], ["a", "b"], ["a", "b"]) == 1.0
    assert finetune.macro_f1(
        ["a", "a", "b", "b"], ["a", "a", "a", "a"], ["a", "b"]
    ) == pytest.approx((2 * 2 / (2 * 2 + 2) + 0.0) / 2)


@pytest.mark.integration
@pytest.mark.slow  # the recipe's whole build: the evaluation and int8 plans take a minute
def test_smoke_training_run_writes_a_standard_model_directory(tmp_path: Path) -> None:
    dest = tmp_path / "smoke"
    dest.mkdir()  # build's contract: an empty directory, as the model-source step gives it
    metrics = recipe.build(dest, config=SMOKE)
    config = json.loads((dest / "config.json").read_text())
    assert config["id2label"] == {"0": "NEGATIVE", "1": "NEUTRAL", "2": "POSITIVE"}
    assert (dest / "model.safetensors").stat().st_size > 10_000_000
    assert (dest / "tokenizer.json").is_file()
    assert (dest / "onnx" / "model.onnx").is_file()
    card = (dest / "README.md").read_text()
    assert "Smoke build" in card
    assert "## Inference graphs (ONNX Runtime)" in card
    for needle in ("Hutto", "MIT", "Apache-2.0"):
        assert needle in card
    assert metrics["train_examples"] == 96
    assert 0 <= metrics["movie_polar_accuracy"] <= 1
    model = TextClassifier.load(dest, max_tokens=32, threads=1)
    assert model.labels == ["NEGATIVE", "NEUTRAL", "POSITIVE"]
    assert len(model.predict(["fine", "bad"])) == 2


@pytest.mark.integration
def test_smoke_training_is_deterministic(tmp_path: Path, ratings: list) -> None:
    """The recipe's training step, twice: the same bytes (what the prepared-model cache and
    `make model`'s fingerprint rest on). Its evaluation is plain inference on these weights."""
    train = [finetune.Example(r.text, r.label) for r in ratings if not r.held_out]
    for name in ("a", "b"):
        model, tokenizer = finetune.fine_tune(
            recipe._base_model_dir(), train, recipe.LABELS, SMOKE, description=f"smoke {name}"
        )
        finetune.save_model(model, tokenizer, tmp_path / name)
    for file in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


@pytest.mark.integration
def test_full_model_meets_the_acceptance_figures(sentiment_model_dir: Path) -> None:
    info = json.loads((sentiment_model_dir / BUILD_INFO).read_text())
    if not info["source"].startswith("recipe:"):
        pytest.fail(f"models/sentiment came from {info['source']}, not the recipe")
    # The model on disk is what the current recipe produces (the cache key is up to date).
    assert info["fingerprint"] == {"kind": "recipe", **recipe.fingerprint()}
    m = info["metrics"]
    assert m["train_examples"] > 20_000
    assert m["movie_polar_accuracy"] >= recipe.MOVIE_BAR
    assert m["movie_polar_n"] > 800
    assert 0.5 < m["macro_f1"] <= 1.0
    assert m["train_seconds"] <= 600
    card = (sentiment_model_dir / "README.md").read_text()
    assert f"**{m['movie_polar_accuracy']:.3f}**" in card
    assert f"**{m['macro_f1']:.3f}**" in card


@pytest.mark.integration
def test_mean_pooling_layer_makes_cls_the_normalised_mean(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = recipe._base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3).eval()
    enc = tokenizer(
        ["short", "a rather longer sentence, padded less than the first"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        states = model.base_model(**enc).last_hidden_state
    finetune.append_mean_pooling_layer(model)
    with torch.no_grad():
        cls = model.base_model(**enc).last_hidden_state[:, 0]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)  # padding excluded
    expected = torch.nn.functional.layer_norm(mean, (mean.shape[-1],), eps=1e-12)
    assert torch.allclose(cls, expected, atol=1e-2)
    assert model.config.num_hidden_layers == 7
    # Still a standard checkpoint: saved and reloaded by plain transformers, same outputs.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**enc).logits, model(**enc).logits)
