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
"this is the article's topic" on the cosine. Label embeddings are cached (bounded, with a share
per caller that one caller's new labels cannot exceed: :class:`LabelCache`), so a label set seen
before costs no model call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aifn import Prediction, Scores, rank

TEMPERATURE = 0.025
SLOPE = 18.0
MIDPOINT = 0.16


# Text embedder: one (unit vector, truncated) pair per text, e.g. TextEncoder.rows or
# Predictor.embed (the batcher in front of it).
Embed = Callable[[list[str]], list[tuple[np.ndarray, bool]]]


class LabelCache:
    """Embeddings of label prompts, shared by every caller, that no one caller can flush.

    Two segments, as in a segmented LRU, with owners:

    - *own*: a prompt only one caller has used. Each caller holds at most ``share`` of these;
      past that, its own least recently used entry makes room, never another caller's.
    - *shared*: a prompt a second caller has used too. One caller's requests alone never put an
      entry here, so a caller sending random labels can displace at most ``share`` entries of
      others (its share, once), and never a label set that several callers use.

    When the cache is over ``capacity``, the least recently used *own* entry goes first; the
    shared segment holds at most three quarters of ``capacity``. Safe across threads.

    Args:
        embed: The encoder for prompts not cached.
        capacity: Most entries in all.
        share: Most *own* entries one caller may hold (default: ``capacity``, no limit).
    """

    def __init__(self, embed: Embed, capacity: int, *, share: int | None = None) -> None:
        self._embed = embed
        self._capacity = capacity
        self.share = max(1, share if share is not None else capacity)
        self._shared_capacity = max(1, capacity - capacity // 4)
        self._shared: OrderedDict[str, np.ndarray] = OrderedDict()
        self._own: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()
        self._owned: dict[str, OrderedDict[str, None]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._shared) + len(self._own)

    def owned(self, owner: str) -> int:
        """How many *own* entries ``owner`` holds."""
        with self._lock:
            return len(self._owned.get(owner, ()))

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts not cached now (no counters, no recency change)."""
        with self._lock:
            return [
                p for p in dict.fromkeys(prompts) if p not in self._shared and p not in self._own
            ]

    def lookup(
        self, prompts: Sequence[str], owner: str = ""
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """(cached vectors by prompt, prompts not cached), counting each distinct prompt once."""
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for prompt in dict.fromkeys(prompts):
                vector = self._shared.get(prompt)
                if vector is not None:
                    self._shared.move_to_end(prompt)
                    found[prompt] = vector
                    continue
                entry = self._own.get(prompt)
                if entry is None:
                    continue
                holder, vector = entry
                found[prompt] = vector
                if holder == owner:
                    self._own.move_to_end(prompt)
                    self._owned[holder].move_to_end(prompt)
                else:  # a second caller uses it: it becomes everyone's
                    self._disown(prompt)
                    self._shared[prompt] = vector
                    while len(self._shared) > self._shared_capacity:
                        self._shared.popitem(last=False)
            missing = [p for p in dict.fromkeys(prompts) if p not in found]
            self.hits += len(found)
            self.misses += len(missing)
        return found, missing

    def store(self, prompts: Sequence[str], vectors: Sequence[np.ndarray], owner: str = "") -> None:
        """Cache new prompts' vectors as ``owner``'s own entries (see the class docstring)."""
        with self._lock:
            for prompt, vector in zip(prompts, vectors, strict=True):
                if prompt in self._shared or prompt in self._own:
                    continue  # another request stored it meanwhile
                while len(self._owned.get(owner, ())) >= self.share:
                    self._disown(next(iter(self._owned[owner])))
                # A copy: a row of a batch array would keep the whole batch alive in the cache.
                self._own[prompt] = (owner, np.array(vector, dtype=np.float32))
                self._owned.setdefault(owner, OrderedDict())[prompt] = None
            while len(self) > self._capacity:
                if self._own:
                    self._disown(next(iter(self._own)))
                else:
                    self._shared.popitem(last=False)

    def _disown(self, prompt: str) -> None:
        """Remove ``prompt`` from the own segment (the lock is held)."""
        holder, _ = self._own.pop(prompt)
        held = self._owned[holder]
        del held[prompt]
        if not held:
            del self._owned[holder]

    def embeddings(self, prompts: Sequence[str], owner: str = "") -> np.ndarray:
        """A ``(len(prompts), dim)`` array; only prompts not cached reach the model."""
        found, missing = self.lookup(prompts, owner)
        if missing:
            vectors = [row for row, _ in self._embed(missing)]
            self.store(missing, vectors, owner)
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

    def __init__(self, embed: Embed, *, cache_size: int, cache_share: int | None = None) -> None:
        self._embed = embed
        self.label_cache = LabelCache(embed, cache_size, share=cache_share)

    def new_prompts(self, label_prompts: Sequence[str]) -> list[str]:
        """The distinct label prompts a request would have to embed: those not cached now."""
        return self.label_cache.missing(label_prompts)

    def head(
        self,
        labels: Sequence[str],
        *,
        descriptions: Mapping[str, str],
        template: str,
        multi_label: bool,
        threshold: float,
        owner: str = "",
    ) -> ZeroShotHead:
        """What a request's labels make of a text's embedding, for :meth:`Predictor.predict`.

        ``owner`` is the caller new label embeddings are cached for (:class:`LabelCache`).
        """
        return ZeroShotHead(
            self,
            list(labels),
            prompts(labels, descriptions, template),
            multi_label,
            threshold,
            owner,
        )

    def similarities(
        self, texts: Sequence[str], label_prompts: Sequence[str], owner: str = ""
    ) -> list[Scores]:
        """Each text's cosine similarity to each label prompt, and its truncation."""
        found, missing = self.label_cache.lookup(label_prompts, owner)
        # New label prompts ride in the same model call as the texts: one pass, not two.
        pairs = self._embed([*missing, *texts])
        vectors = [row for row, _ in pairs]
        truncated = [cut for _, cut in pairs]
        if missing:
            self.label_cache.store(missing, vectors[: len(missing)], owner)
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


class ZeroShotHead:
    """Scores over one request's labels (an :class:`aifn.Head`).

    The prediction cache keeps each text's cosine similarities, keyed by the label prompts
    (``params``): single- and multi-label requests over the same labels share entries.
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        labels: list[str],
        label_prompts: list[str],
        multi_label: bool,
        threshold: float,
        owner: str,
    ) -> None:
        self._classifier = classifier
        self._labels = labels
        self._prompts = label_prompts
        self._multi_label = multi_label
        self._threshold = threshold
        self._owner = owner
        self.params = {"prompts": label_prompts}
        self.width = len(label_prompts)

    def compute(self, texts: list[str]) -> list[Scores]:
        return self._classifier.similarities(texts, self._prompts, self._owner)

    def predictions(self, rows: list[tuple[Scores, bool]]) -> list[Prediction]:
        similarity = np.array([s.values for s, _ in rows], dtype=np.float64).reshape(
            len(rows), self.width
        )
        table: list[list[float]] = scores(similarity, multi_label=self._multi_label).tolist()
        results = []
        for row, (sims, cached) in zip(table, rows, strict=True):
            ranked = rank(self._labels, row)
            # Compared as shown in the response (6 decimals), so `matches` agrees with the scores.
            matches = (
                [lbl for lbl, s in ranked if round(s, 6) >= self._threshold]
                if self._multi_label
                else None
            )
            results.append(
                Prediction(labels=ranked, truncated=sims.truncated, matches=matches, cached=cached)
            )
        return results
