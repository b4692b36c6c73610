"""Models loaded from a local Hugging Face directory: load, warm up, run.

Two kinds: a :class:`TextClassifier` (fixed labels, a probability per label) and a
:class:`TextEncoder` (a sentence embedding per text, for zero-shot scoring against any labels).
Lists in, lists out: a single text is a list of one. A model is loaded once per process, before
the port opens, and never from the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

from aifn import quantize as quantization
from aifn.errors import ConfigError
from aifn.simplify import simplify

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Files that define a model's behaviour; their bytes make up its revision hash.
IDENTITY_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
BUILD_INFO = "aifn-model.json"


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: a name and a content hash of its files."""

    name: str
    revision: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "revision": self.revision}


@dataclass(frozen=True)
class Scores:
    """One text's raw scores, one per label in the caller's order, and its truncation."""

    values: tuple[float, ...]
    truncated: bool


@dataclass(frozen=True)
class Prediction:
    """One text's result: the top label, every label ranked by score, and truncation."""

    labels: list[tuple[str, float]]
    truncated: bool
    # Multi-label results: the labels whose independent score reached the threshold.
    matches: list[str] | None = None
    # Whether the prediction cache answered (None: no cache was consulted).
    cached: bool | None = None

    @property
    def label(self) -> str:
        return self.labels[0][0]

    @property
    def score(self) -> float:
        return self.labels[0][1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "score": round(self.score, 6),
            "labels": [{"label": lbl, "score": round(s, 6)} for lbl, s in self.labels],
            "truncated": self.truncated,
        }
        if self.matches is not None:
            out["matches"] = self.matches
        if self.cached is not None:
            out["cached"] = self.cached
        return out


CLASSIFIER = "classifier"
ENCODER = "encoder"


def model_kind(config: dict[str, Any]) -> str:
    """``"classifier"`` for a sequence-classification checkpoint, else ``"encoder"``.

    A classifier maps a text to scores over its fixed labels; an encoder (a sentence-embedding
    model such as all-MiniLM-L6-v2) maps it to a vector.
    """
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return CLASSIFIER
    return ENCODER


def check_model_dir(path: Path) -> dict[str, Any]:
    """Check that ``path`` holds a loadable classifier or encoder and return its ``config.json``.

    Raises:
        ConfigError: With a message saying what is missing or wrong.
    """
    if not path.is_dir():
        raise ConfigError(
            f"model directory {path} does not exist; run `make model` or set MODEL_DIR"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} is missing: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a JSON object")
    if model_kind(config) == CLASSIFIER:
        id2label = config.get("id2label")
        if not isinstance(id2label, dict) or len(id2label) < 2:
            raise ConfigError(f"{config_path} has no id2label with at least two labels")
    else:
        _check_pooling(path)
    if not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"{path} has no model.safetensors; only safetensors weights are loaded "
            "(pickled .bin weights can run code)"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ConfigError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)")
    return config


def check_weights(path: Path, info: dict[str, Any], unused: tuple[str, ...] = ()) -> None:
    """Refuse weights that leave part of the model random: tensors missing or of other shapes.

    transformers fills such tensors with random values and carries on (a classifier without its
    head would answer, wrongly); ``info`` is its ``output_loading_info``. Missing tensors whose
    dotted name has a part in ``unused`` are allowed (an encoder never uses BERT's pooler).

    Raises:
        ConfigError: Naming the weights file and the first tensors concerned.
    """
    weights = path / "model.safetensors"
    missing = sorted(
        str(k) for k in info.get("missing_keys") or () if not set(str(k).split(".")) & set(unused)
    )
    if missing:
        raise ConfigError(
            f"{weights} lacks {len(missing)} tensor(s) the model needs ({_first(missing)}); "
            "they would be random"
        )
    mismatched = sorted(str(k[0]) for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise ConfigError(
            f"{weights} does not match {path / 'config.json'}: {len(mismatched)} tensor(s) "
            f"have other shapes ({_first(mismatched)})"
        )


def _first(names: list[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_pooling(path: Path) -> None:
    """Encoders are read with mean pooling: refuse a sentence-transformers dir saying otherwise."""
    pooling = path / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    try:
        mean = json.loads(pooling.read_text(encoding="utf-8")).get("pooling_mode_mean_tokens")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ConfigError(f"{pooling} is not a valid pooling config: {exc}") from None
    if mean is not True:
        raise ConfigError(
            f"{pooling} does not use mean pooling; only mean-pooled encoders are supported"
        )


def hash_files(root: Path, files: Iterable[Path]) -> str:
    """SHA-256 hex digest over each file's path (relative to ``root``) and bytes, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """SHA-256 over the files that define the model, as ``sha256:<first 16 hex digits>``."""
    files = [path / name for name in IDENTITY_FILES if (path / name).is_file()]
    return f"sha256:{hash_files(path, files)[:16]}"


def model_name(path: Path, config: dict[str, Any]) -> str:
    """The name recorded by the model-source step, else the config's, else the directory's."""
    info = path / BUILD_INFO
    if info.is_file():
        try:
            name = json.loads(info.read_text(encoding="utf-8")).get("name")
            if isinstance(name, str) and name:
                return name
        except ValueError:
            pass
    name = config.get("_name_or_path")
    if isinstance(name, str) and name and not os.path.isabs(name):
        return name
    return path.resolve().name


class _Tokenizer(Protocol):
    def model_inputs(self, texts: list[str]) -> tuple[dict[str, Any], list[bool]]:
        """Model inputs for ``texts`` (padded to the longest) and whether each was truncated."""
        ...


class _TransformersTokenizer:
    """A transformers tokenizer, truncating at ``max_tokens``.

    It is not safe to call from several threads at once (truncation and padding settings live
    in shared Rust state: "Already borrowed"), so calls run under a lock.
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._lock = threading.Lock()

    def model_inputs(self, texts: list[str]) -> tuple[dict[str, Any], list[bool]]:
        with self._lock:
            enc = self._tokenizer(
                texts,
                truncation=True,
                max_length=self._max_tokens,
                return_overflowing_tokens=True,
                padding=True,
                return_tensors="pt",
            )
        # Overflow rows (the truncated-away tail of a long text) tell us what was truncated;
        # only each text's first row is kept.
        mapping = enc.pop("overflow_to_sample_mapping").tolist()
        first_rows: list[int] = []
        truncated = [False] * len(texts)
        seen: set[int] = set()
        for row, sample in enumerate(mapping):
            if sample in seen:
                truncated[sample] = True
            else:
                seen.add(sample)
                first_rows.append(row)
        inputs = {k: v[first_rows] for k, v in enc.items()}
        if self._tokenizer.padding_side == "right":
            # Overflow rows padded the batch to max_tokens; trim back to the longest kept row.
            width = int(inputs["attention_mask"].sum(dim=1).max())
            inputs = {k: v[:, :width] for k, v in inputs.items()}
        return inputs, truncated


class _TransformerModel:
    """A BERT-family model and its tokenizer.

    BERT models with a ``tokenizer.json`` run on :mod:`aifn.bert` (plain torch, no transformers
    import: a faster cold start); any other model runs on transformers' classes.

    Forward passes may run from several threads at once (the batcher's workers, each with its
    own torch threads: see :meth:`use_threads`).
    """

    kind: ClassVar[str]
    # Parts of the architecture this class never runs: their weights may be absent.
    unused_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        identity: ModelIdentity,
        *,
        max_tokens: int,
        batch_size: int,
        runtime: str = "transformers",
    ) -> None:
        """``model`` and ``tokenizer``: transformers' (training's) or :mod:`aifn.bert`'s."""
        self._model = model
        # A transformers tokenizer is wrapped; this package's tokenizers have model_inputs.
        self._tokenizer: _Tokenizer = (
            tokenizer
            if hasattr(tokenizer, "model_inputs")
            else _TransformersTokenizer(tokenizer, max_tokens)
        )
        self.identity = identity
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        # What runs the model: "aifn.bert" or "transformers".
        self.runtime = runtime
        self.ready = False

    @property
    def labels(self) -> list[str]:
        """The model's fixed labels, in id order; empty for an encoder."""
        return []

    @staticmethod
    def use_threads(threads: int) -> None:
        """Give the calling thread's forward passes ``threads`` intra-op threads.

        torch's intra-op thread count is per calling thread in practice (OpenMP's setting is),
        so each model worker sets its own. Measured on 2 vCPUs: a forward pass from a worker
        thread with 2 intra-op threads was ~60% slower than with 1, and two workers with one
        thread each beat one worker with two by 11-14% in requests/s at 32 connections.
        """
        import torch

        torch.set_num_threads(threads)

    @property
    def module(self) -> Any:
        """The underlying torch module (e.g. to measure a quantized copy of it)."""
        return self._model

    def with_module(self, module: Any) -> Self:
        """The same tokenizer and limits around another module (a quantized copy, say)."""
        return type(self)(
            module,
            self._tokenizer,
            self.identity,
            max_tokens=self.max_tokens,
            batch_size=self.batch_size,
            runtime=self.runtime,
        )

    @staticmethod
    def _auto_class() -> Any:
        raise NotImplementedError

    @classmethod
    def _load_plain(cls, path: Path, config: dict[str, Any], limit: int) -> tuple[Any, _Tokenizer]:
        """The model and tokenizer on :mod:`aifn.bert`."""
        from aifn import bert

        try:
            tokenizer = bert.Tokenizer(path, limit)
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer in {path}: {_one_line(exc)}") from exc
        try:
            model, info = bert.load(path, config, classifier=cls.kind == CLASSIFIER)
        except Exception as exc:
            weights = path / "model.safetensors"
            raise ConfigError(f"could not load the weights {weights}: {_one_line(exc)}") from exc
        check_weights(path, info, unused=cls.unused_weights)
        return model, tokenizer

    @classmethod
    def _load_transformers(cls, path: Path) -> tuple[Any, Any]:
        """The model and tokenizer on transformers' classes (any architecture it knows)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer
        from transformers import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # The libraries raise many types for one cause, a bad file: each becomes one clear line.
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer in {path}: {_one_line(exc)}") from exc
        weights = path / "model.safetensors"
        try:
            # Mis-shaped tensors are reported by check_weights, by name, not as an error that
            # points at a report the quiet logging above hides.
            model, info = cls._auto_class().from_pretrained(
                path,
                local_files_only=True,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
        except Exception as exc:
            raise ConfigError(f"could not load the weights {weights}: {_one_line(exc)}") from exc
        check_weights(path, info, unused=cls.unused_weights)
        return model.eval(), tokenizer

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        max_tokens: int,
        batch_size: int,
        threads: int,
        quantize: str = quantization.OFF,
        runtime: str = "auto",
    ) -> Self:
        """Load the model in ``path`` (offline), quantize it as ``quantize`` says, warm it up.

        ``quantize`` is ``QUANTIZE``'s value (:mod:`aifn.quantize`): ``auto`` applies the int8
        plan recorded when the model was built, if any. ``runtime``: ``auto`` runs the model on
        :mod:`aifn.bert` when it can, ``transformers`` always on transformers' classes.

        Raises:
            ConfigError: The directory is missing, not usable, or not of this class's kind.
        """
        config = check_model_dir(path)
        if model_kind(config) != cls.kind:
            raise ConfigError(
                f"{path} holds an {model_kind(config)} model, but this needs a {cls.kind}"
                if model_kind(config) == ENCODER
                else f"{path} holds a classifier model, but this needs an encoder"
            )
        started = time.perf_counter()

        import torch

        from aifn import bert

        torch.set_num_threads(threads)
        limit = min(
            max_tokens,
            config.get("max_position_embeddings") or max_tokens,
            bert.model_max_length(path) or max_tokens,
        )
        why_not = bert.unsupported(config, path, classifier=cls.kind == CLASSIFIER)
        if runtime == "transformers" or why_not:
            model, tokenizer = cls._load_transformers(path)
            runtime = "transformers"
        else:
            model, tokenizer = cls._load_plain(path, config, limit)
            runtime = "aifn.bert"
        plan = quantization.resolve(quantize, path)
        if plan:
            quantization.apply(model, plan)
        # Exact: the frozen mean-pooling layer's constant matrices become what they compute.
        shortcuts = simplify(model)
        # A quantized model's scores differ slightly: it is its own revision (and cache space).
        revision = content_hash(path) + (f"+{plan}" if plan else "")
        identity = ModelIdentity(model_name(path, config), revision)
        loaded = cls(
            model, tokenizer, identity, max_tokens=limit, batch_size=batch_size, runtime=runtime
        )
        loaded.warm_up()
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": identity.to_json(),
                    "kind": cls.kind,
                    "labels": loaded.labels,
                    "load_seconds": round(time.perf_counter() - started, 3),
                    "torch_threads": threads,
                    "max_tokens": limit,
                    "quantization": plan or "float32",
                    "runtime": runtime,
                    "runtime_reason": why_not,
                    "shortcut_layers": len(shortcuts),
                }
            },
        )
        return loaded

    def warm_up(self) -> None:
        """Run one short and one full-length inference so the first request pays no set-up."""
        self._chunked(["warm-up", "warm " * self.max_tokens], self._forward)
        self.ready = True

    def _chunked(
        self, texts: Sequence[str], forward: Callable[[Any], list[_T]]
    ) -> tuple[list[_T], list[bool]]:
        """Run ``forward`` over ``texts`` in length-grouped chunks; outputs in input order."""
        outputs: list[Any] = [None] * len(texts)
        truncated = [False] * len(texts)
        for idx in length_groups([len(t) for t in texts], self.batch_size):
            inputs, cut = self._tokenizer.model_inputs([texts[i] for i in idx])
            rows = forward(inputs)
            for pos, i in enumerate(idx):
                outputs[i] = rows[pos]
                truncated[i] = cut[pos]
        return outputs, truncated

    def _forward(self, inputs: dict[str, Any]) -> list[Any]:
        raise NotImplementedError


class TextClassifier(_TransformerModel):
    """A sequence-classification model: each text gets a score for each of its fixed labels."""

    kind = CLASSIFIER

    @functools.cached_property
    def labels(self) -> list[str]:
        """The model's labels, in id order (its ``config.id2label``)."""
        id2label = self._model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    @staticmethod
    def _auto_class() -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def probabilities(self, texts: Sequence[str]) -> tuple[list[list[float]], list[bool]]:
        """Each text's probability per label (in :attr:`labels` order) and its truncation."""
        return self._chunked(texts, self._forward)

    def scores(self, texts: Sequence[str]) -> list[Scores]:
        """:meth:`probabilities` as one :class:`Scores` per text (what the cache stores)."""
        probs, truncated = self.probabilities(texts)
        return [Scores(tuple(p), t) for p, t in zip(probs, truncated, strict=True)]

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Classify every text; results are in input order."""
        probs, truncated = self.probabilities(texts)
        return [
            Prediction(labels=rank(self.labels, p), truncated=t)
            for p, t in zip(probs, truncated, strict=True)
        ]

    def _forward(self, inputs: dict[str, Any]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            probs: list[list[float]] = torch.softmax(
                self._model(**inputs).logits.float(), dim=-1
            ).tolist()
        return probs


class TextEncoder(_TransformerModel):
    """A sentence encoder: each text becomes a unit-length vector (mean of its token states).

    Cosine similarity between two texts is the dot product of their vectors.
    """

    kind = ENCODER
    unused_weights = ("pooler",)  # mean pooling over the token states; BERT's pooler is unused

    @staticmethod
    def _auto_class() -> Any:
        from transformers import AutoModel

        return AutoModel

    def embed(self, texts: Sequence[str]) -> tuple[Any, list[bool]]:
        """A ``(len(texts), dim)`` float tensor of normalised embeddings, and each truncation."""
        import torch

        rows, truncated = self._chunked(texts, self._forward)
        return torch.stack(rows), truncated

    def rows(self, texts: Sequence[str]) -> list[tuple[Any, bool]]:
        """One ``(embedding, truncated)`` pair per text (what the batcher hands out)."""
        rows, truncated = self._chunked(texts, self._forward)
        return list(zip(rows, truncated, strict=True))

    def _forward(self, inputs: dict[str, Any]) -> list[Any]:
        import torch

        with torch.inference_mode():
            states = self._model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            return list(torch.nn.functional.normalize(mean, dim=-1))


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, cut into chunks of at most ``batch_size`` similar lengths.

    A chunk is padded to its longest text, so a new chunk starts when a text is more than twice
    as long (plus a margin) as the chunk's shortest: one long text among many short ones then
    costs its own small pass instead of padding every short one to its length.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (
            len(current) >= batch_size or lengths[i] > 2 * lengths[current[0]] + _LENGTH_MARGIN
        ):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


# Characters of slack before a longer text starts its own chunk (~16 tokens).
_LENGTH_MARGIN = 64


def rank(labels: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """Pair labels with scores, highest score first (ties keep label order)."""
    return sorted(zip(labels, scores, strict=True), key=lambda p: p[1], reverse=True)


def load_model(
    path: Path,
    *,
    max_tokens: int,
    batch_size: int,
    threads: int,
    kinds: Sequence[str],
    quantize: str = quantization.OFF,
    runtime: str = "auto",
) -> TextClassifier | TextEncoder:
    """Load whichever kind of model ``path`` holds, if it is one of ``kinds``.

    Raises:
        ConfigError: The directory is unusable, or holds a kind of model not in ``kinds``.
    """
    kind = model_kind(check_model_dir(path))
    if kind not in kinds:
        raise ConfigError(
            f"{path} holds {'an encoder' if kind == ENCODER else 'a classifier'} model; this "
            f"function serves {' or '.join(kinds)} models"
        )
    cls: type[TextClassifier | TextEncoder] = TextClassifier if kind == CLASSIFIER else TextEncoder
    return cls.load(
        path,
        max_tokens=max_tokens,
        batch_size=batch_size,
        threads=threads,
        quantize=quantize,
        runtime=runtime,
    )
