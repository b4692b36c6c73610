"""Zero-shot scoring, the label cache, and the default classify model's recorded figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from aifn.build import model_source
from aifn.core.model import BUILD_INFO, TextEncoder

from .helpers import CLASSIFY_MODEL, REPO

CLASSIFY = REPO / "functions" / "classify"

sys.path.insert(0, str(CLASSIFY))
import zero_shot  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    if not (CLASSIFY_MODEL / "config.json").is_file():
        pytest.fail(f"{CLASSIFY_MODEL} is not prepared: run `make model` (make test does)")
    return TextEncoder.load(CLASSIFY_MODEL, max_tokens=64, threads=1)


def test_single_label_scores_are_a_distribution_that_keeps_the_order() -> None:
    similarity = np.array([[0.30, 0.10, 0.05], [0.02, 0.01, 0.00]])
    scores = zero_shot.scores(similarity, multi_label=False)
    assert scores.sum(axis=-1).tolist() == pytest.approx([1.0, 1.0])
    assert scores.argmax(axis=-1).tolist() == [0, 0]
    # Small cosine gaps still separate: 0.2 apart is a confident answer.
    assert scores[0, 0] > 0.99


def test_multi_label_scores_are_independent_with_the_midpoint_at_one_half() -> None:
    similarity = np.array([[zero_shot.MIDPOINT, 0.5, -0.2]])
    scores = zero_shot.scores(similarity, multi_label=True)[0].tolist()
    assert scores[0] == pytest.approx(0.5)
    assert scores[1] > 0.99
    assert scores[2] < 0.01
    # Adding a label changes no other label's score.
    wider = zero_shot.scores(np.array([[zero_shot.MIDPOINT, 0.5, -0.2, 0.4]]), multi_label=True)
    assert wider[0, :3].tolist() == pytest.approx(scores)


def test_prompts_use_descriptions_then_the_template() -> None:
    assert zero_shot.prompts(
        ["billing", "bug"], {"billing": "Invoices and payments."}, "About {label}."
    ) == ["Invoices and payments.", "About bug."]


def test_label_cache_embeds_each_prompt_once_and_evicts_least_recent(encoder: TextEncoder) -> None:
    cache = zero_shot.LabelCache(encoder.rows, capacity=2)
    first = cache.embeddings(["sport", "politics"])
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)
    again = cache.embeddings(["politics", "sport"])
    assert (cache.hits, cache.misses) == (2, 2)
    assert np.array_equal(again, first[::-1])
    cache.embeddings(["sport"])  # politics is now the least recently used
    cache.embeddings(["music"])
    assert len(cache) == 2
    cache.embeddings(["sport"])
    assert cache.misses == 3
    cache.embeddings(["politics"])
    assert cache.misses == 4
    # A cached vector is the encoder's own answer.
    direct, _ = encoder.embed(["sport"])
    assert np.array_equal(cache.embeddings(["sport"])[0], direct[0])


def test_embeddings_are_unit_length_and_similar_texts_are_closer(encoder: TextEncoder) -> None:
    vectors, truncated = encoder.embed(
        ["The match ended in a draw.", "The game finished level.", "Parliament passed the law."]
    )
    assert truncated == [False, False, False]
    assert np.linalg.norm(vectors, axis=-1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_long_text_is_reported_truncated(encoder: TextEncoder) -> None:
    _, truncated = encoder.embed(["word " * 200, "short"])
    assert truncated == [True, False]


def test_default_model_is_current_and_meets_the_bbc_bar() -> None:
    """`make model` built models/classify from the current recipe, and its card's figures hold."""
    recipe = model_source.load_recipe(CLASSIFY / "recipe.py")
    info = json.loads((CLASSIFY_MODEL / BUILD_INFO).read_text())
    assert info["fingerprint"] == json.loads(
        json.dumps({"kind": "recipe", **recipe.fingerprint()})
    ), "models/classify is stale: run `make model`"
    test = info["metrics"]["bbc_test"]
    assert test["n"] == 500
    assert test["descriptions"]["accuracy"] >= 0.85
    # Descriptions help: bare names and the template are reported, and are lower.
    assert test["bare_labels"]["accuracy"] < test["template"]["accuracy"]
    assert test["template"]["accuracy"] < test["descriptions"]["accuracy"]
    card = (CLASSIFY_MODEL / "README.md").read_text()
    assert f"| label descriptions | {test['descriptions']['accuracy']:.3f} |" in card


def test_model_source_refuses_an_encoder_with_other_pooling(tmp_path: Path) -> None:
    from aifn.core.errors import ConfigError
    from aifn.core.model import check_model_dir

    for name in ("config.json", "tokenizer.json", "onnx"):
        (tmp_path / name).symlink_to(CLASSIFY_MODEL / name, target_is_directory=name == "onnx")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(ConfigError, match="does not use mean pooling"):
        check_model_dir(tmp_path)


def test_single_and_multi_label_share_cached_similarities(encoder: TextEncoder) -> None:
    from aifn.core.batcher import DynamicBatcher
    from aifn.core.cache import MemoryBackend, PredictionCache
    from aifn.core.limits import WorkLimits
    from aifn.core.predictor import Predictor

    cache = PredictionCache(MemoryBackend(100), namespace="classify:sha256:test", ttl=60)
    batcher = DynamicBatcher(encoder.rows, max_batch=8, max_wait=0, max_queued=64, timeout=30)
    limits = WorkLimits(
        CLASSIFY_MODEL / "tokenizer.json",
        max_text_chars=2048,
        max_tokens=64,
        max_request_tokens=16_384,
    )
    predictor = Predictor(encoder, cache, batcher, limits)
    classifier = zero_shot.ZeroShotClassifier(predictor.embed, cache_size=16)
    args: dict = {"descriptions": {}, "template": "This is about {label}.", "threshold": 0.5}
    labels = ["sport", "politics"]
    text = ["The match ended 2-1."]
    single = predictor.predict(text, classifier.head(labels, multi_label=False, **args))
    misses = classifier.label_cache.misses
    multi = predictor.predict(text, classifier.head(labels, multi_label=True, **args))
    assert single[0].cached is False
    assert multi[0].cached is True
    assert classifier.label_cache.misses == misses  # the encoder did not run again
    assert multi[0].label == single[0].label == "sport"
    assert multi[0].matches is not None
    # Other labels are other parameters: a miss.
    other = predictor.predict(text, classifier.head(["sport", "music"], multi_label=False, **args))
    assert other[0].cached is False
