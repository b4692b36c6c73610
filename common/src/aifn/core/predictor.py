"""The one way to predictions: a model behind the prediction cache and the dynamic batcher.

Both callers, the HTTP edge (:mod:`aifn.http`) and the file path (:mod:`aifn.files`), ask a
:class:`Predictor`; neither reaches the model, the cache or the batcher on its own. One call,
:meth:`Predictor.predict`, runs the same steps for every kind of model::

    cut each text to MAX_TEXT_CHARS -> prediction cache -> (misses) head.compute -> batcher
      -> model -> head.predictions -> results marked `truncated` where cut

A :class:`Head` says what a model's output means for one request: the classifier's own labels
(:class:`ClassifierHead`, optionally narrowed), or a function's own scoring such as zero-shot
labels (``functions/classify/zero_shot.py``). Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from aifn.core.batcher import DynamicBatcher
from aifn.core.cache import PredictionCache, from_settings
from aifn.core.limits import WorkLimits, mark_cut
from aifn.core.model import (
    CLASSIFIER,
    Prediction,
    Scores,
    TextClassifier,
    TextEncoder,
    load_model,
    rank,
)
from aifn.settings import Settings


class Head(Protocol):
    """What one request asks of the model's output, besides its texts."""

    @property
    def params(self) -> Any:
        """Everything besides a text that changes its scores (JSON-able; part of cache keys)."""

    @property
    def width(self) -> int:
        """Scores per text."""

    def compute(self, texts: list[str]) -> list[Scores]:
        """Scores of the texts the cache did not have (model work, through the batcher)."""

    def predictions(self, rows: list[tuple[Scores, bool]]) -> list[Prediction]:
        """Each text's (scores, came from the cache) as its :class:`Prediction`."""


class ClassifierHead:
    """A classifier's probabilities over its labels; with ``labels``, renormalised over those.

    The cache keeps the model's full distribution (``params`` is ``None`` whatever ``labels``
    is), so every narrowing shares the same entries.
    """

    params = None

    def __init__(
        self,
        model_labels: Sequence[str],
        compute: Callable[[list[str]], list[Scores]],
        labels: Sequence[str] | None = None,
    ) -> None:
        self._model_labels = list(model_labels)
        self._labels = list(labels) if labels is not None else None
        self.width = len(self._model_labels)
        self.compute = compute

    def predictions(self, rows: list[tuple[Scores, bool]]) -> list[Prediction]:
        if self._labels is None:
            return [
                Prediction(rank(self._model_labels, s.values), s.truncated, cached=cached)
                for s, cached in rows
            ]
        keep = self._labels
        columns = [self._model_labels.index(label) for label in keep]
        results = []
        for row, cached in rows:
            picked = [row.values[c] for c in columns]
            total = sum(picked) or 1.0
            results.append(
                Prediction(rank(keep, [p / total for p in picked]), row.truncated, cached=cached)
            )
        return results


class Predictor:
    """A loaded model with its prediction cache, batcher and work limits.

    Args:
        model: The model (a classifier or an encoder).
        cache: The prediction cache every prediction goes through.
        batcher: The queue in front of the model (``model.scores`` or ``model.rows``).
        limits: ``MAX_TEXT_CHARS`` and ``MAX_REQUEST_TOKENS``, with the model's tokenizer.
    """

    def __init__(
        self,
        model: TextClassifier | TextEncoder,
        cache: PredictionCache,
        batcher: DynamicBatcher[Any],
        limits: WorkLimits,
    ) -> None:
        self.model = model
        self.cache = cache
        self.batcher = batcher
        self.limits = limits

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        function: str,
        kinds: Sequence[str] = (CLASSIFIER,),
        on_batch: Callable[[int, float], None] | None = None,
    ) -> Predictor:
        """Load and warm up the model in ``MODEL_DIR``, and build its cache and batcher.

        Raises:
            ConfigError: The model directory or a cache setting is unusable.
        """
        model = load_model(
            settings.model_dir,
            kinds=kinds,
            max_tokens=settings.max_tokens,
            threads=settings.intra_op_threads,
            quantize=settings.quantize,
        )
        cache = from_settings(settings, function=function, revision=model.identity.revision)
        batcher: DynamicBatcher[Any] = DynamicBatcher(
            model.scores if isinstance(model, TextClassifier) else model.rows,
            max_batch=settings.inference_batch_size,
            max_wait=settings.batch_wait_ms / 1000,
            max_queued=settings.max_queued_texts,
            timeout=settings.request_timeout_seconds,
            name=function,
            workers=settings.model_workers,
            on_batch=on_batch,
        )
        # MAX_TEXT_CHARS and MAX_REQUEST_TOKENS, counted with the model's own tokenizer.
        limits = WorkLimits.from_settings(settings, max_tokens=model.max_tokens)
        return cls(model, cache, batcher, limits)

    @property
    def labels(self) -> list[str]:
        """A classifier's labels (an encoder has none)."""
        return self.model.labels

    def check(self, texts: Sequence[str], prompts: Sequence[str] = ()) -> None:
        """Refuse a request that would make the model read more than ``MAX_REQUEST_TOKENS``.

        Raises:
            TooManyTokens: Over the budget; nothing was done.
        """
        self.limits.check(texts, prompts)

    def predict(self, texts: Sequence[str], head: Head | None = None) -> list[Prediction]:
        """Every text's prediction, in input order: the only path from texts to results.

        Args:
            head: What the model's output means for this request; default: a classifier's
                scores over all its labels.
        """
        if head is None:
            head = self.classifier_head()
        cut_texts, cut = self.limits.cut(texts)
        rows = self.cache.get_or_compute(
            cut_texts, params=head.params, width=head.width, compute=head.compute
        )
        return mark_cut(head.predictions(rows), cut)

    def classifier_head(self, labels: Sequence[str] | None = None) -> ClassifierHead:
        """The classifier's own labels, or ``labels`` among them (renormalised)."""
        if not isinstance(self.model, TextClassifier):
            raise TypeError(f"{self.model.identity.name} is an encoder, not a classifier")
        return ClassifierHead(self.model.labels, self.batcher, labels)

    def embed(self, texts: list[str]) -> list[tuple[np.ndarray, bool]]:
        """An encoder's (unit vector, truncated) per text, through the batcher, never cached.

        For a :class:`Head`'s ``compute`` (zero-shot embeds label prompts with the texts).
        """
        rows: list[tuple[np.ndarray, bool]] = self.batcher(texts)
        return rows
