"""Zero-shot classification: score texts against the caller's labels with a sentence encoder.

Each label becomes a short text (its description if the caller gave one, else the label in a
template such as "This is about {label}."), embedded by the same encoder as the texts. A text's
cosine similarity to each label is turned into scores:

- single-label: a softmax over the labels at temperature :data:`TEMPERATURE`, so the scores form
  a distribution;
- multi-label: an independent logistic curve per label, ``sigmoid(SLOPE * (cos - MIDPOINT))``, so
  a text can match several labels or none.

The constants were fitted on the BBC News dev split (``bbc.py``), never on its test split: the
temperature minimises the softmax's log-loss; slope and midpoint are a logistic regression of
"this is the article's topic" on the cosine. Label embeddings are cached (bounded LRU), so a
label set seen before costs no model call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aifn.cache import PredictionCache
from aifn.model import Prediction, Scores, rank

TEMPERATURE = 0.025
SLOPE = 18.0
MIDPOINT = 0.16


# Text embedder: one (unit vector, truncated) pair per text, e.g. TextEncoder.rows or the
# function's batcher in front of it.
Embed = Callable[[list[str]], list[tuple[np.ndarray, bool]]]


class LabelCache:
    """Embeddings of label prompts, least recently used evicted first; safe across threads."""

    def __init__(self, embed: Embed, capacity: int) -> None:
        self._embed = embed
        self._capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def lookup(self, prompts: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """(cached vectors by prompt, prompts not cached), counting each distinct prompt once."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for prompt in prompts:
                vector = self._vectors.get(prompt)
                if vector is not None:
                    self._vectors.move_to_end(prompt)
                    found[prompt] = vector
            missing = [p for p in dict.fromkeys(prompts) if p not in found]
            self.hits += len(found)
            self.misses += len(missing)
        return found, missing

    def store(self, prompts: Sequence[str], vectors: Sequence[np.ndarray]) -> None:
        with self._lock:
            for prompt, vector in zip(prompts, vectors, strict=True):
                # A copy: a row of a batch array would keep the whole batch alive in the cache.
                self._vectors[prompt] = np.array(vector, dtype=np.float32)
                self._vectors.move_to_end(prompt)
            while len(self._vectors) > self._capacity:
                self._vectors.popitem(last=False)

    def embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """A ``(len(prompts), dim)`` array; only prompts not cached reach the model."""
        found, missing = self.lookup(prompts)
        if missing:
            vectors = [row for row, _ in self._embed(missing)]
            self.store(missing, vectors)
            found.update(zip(missing, vectors, strict=True))
        return np.stack([found[p] for p in prompts])


def prompts(labels: Sequence[str], descriptions: Mapping[str, str], template: str) -> list[str]:
    """The text each label is embedded as: its description, else the label in the template."""
    return [
        descriptions.get(label) or template.replace("{label}", label.strip()) for label in labels
    ]


def scores(similarity: np.ndarray, *, multi_label: bool) -> np.ndarray:
    """Cosine similarities ``(texts, labels)`` to scores in 0..1 (see the module docstring).

    Computed in float64: the scores are rounded to 6 decimals in responses, and a text's
    scores must not depend on anything but its own similarities.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if multi_label:
        sigmoid: np.ndarray = 1.0 / (1.0 + np.exp(-SLOPE * (similarity - MIDPOINT)))
        return sigmoid
    logits = similarity / TEMPERATURE
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    softmax: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return softmax


class ZeroShotClassifier:
    """Classify texts into any labels with sentence embeddings (see :data:`Embed`)."""

    def __init__(self, embed: Embed, *, cache_size: int) -> None:
        self._embed = embed
        self.label_cache = LabelCache(embed, cache_size)

    def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        descriptions: Mapping[str, str],
        template: str,
        multi_label: bool,
        threshold: float,
        cache: PredictionCache,
    ) -> list[Prediction]:
        """Score every text against every label; ``cache`` keeps each text's similarities."""
        label_prompts = prompts(labels, descriptions, template)
        # The cache keeps cosine similarities, keyed by the label prompts: single- and
        # multi-label requests over the same labels share entries.
        rows = cache.get_or_compute(
            texts,
            params={"prompts": label_prompts},
            width=len(label_prompts),
            compute=lambda missing: self.similarities(missing, label_prompts),
        )
        similarity = np.array([s.values for s, _ in rows], dtype=np.float64).reshape(
            len(rows), len(label_prompts)
        )
        table: list[list[float]] = scores(similarity, multi_label=multi_label).tolist()
        results = []
        for row, (sims, cached) in zip(table, rows, strict=True):
            ranked = rank(labels, row)
            # Compared as shown in the response (6 decimals), so `matches` agrees with the scores.
            matches = (
                [lbl for lbl, s in ranked if round(s, 6) >= threshold] if multi_label else None
            )
            results.append(
                Prediction(labels=ranked, truncated=sims.truncated, matches=matches, cached=cached)
            )
        return results

    def similarities(self, texts: Sequence[str], label_prompts: Sequence[str]) -> list[Scores]:
        """Each text's cosine similarity to each label prompt, and its truncation."""
        found, missing = self.label_cache.lookup(label_prompts)
        # New label prompts ride in the same model call as the texts: one pass, not two.
        pairs = self._embed([*missing, *texts])
        vectors = [row for row, _ in pairs]
        truncated = [cut for _, cut in pairs]
        if missing:
            self.label_cache.store(missing, vectors[: len(missing)])
            found.update(zip(missing, vectors[: len(missing)], strict=True))
        # In float64 (sums of float32 products, exact to far below the 6 decimals shown), so a
        # text's similarities do not depend on how many texts or labels share the product.
        label_vectors = np.stack([found[p] for p in label_prompts]).astype(np.float64)
        texts_vectors = np.stack(vectors[len(missing) :]).astype(np.float64)
        table: list[list[float]] = (texts_vectors @ label_vectors.T).tolist()
        return [
            Scores(tuple(row), cut)
            for row, cut in zip(table, truncated[len(missing) :], strict=True)
        ]
