"""Models served on ONNX Runtime from a prepared model directory: load, warm up, run.

Two kinds: a :class:`TextClassifier` (fixed labels, a probability per label) and a
:class:`TextEncoder` (a unit-length sentence embedding per text, for zero-shot scoring against
any labels). Lists in, lists out: a single text is a list of one. A model is loaded once per
process, before the port opens, and never from the network.

A *prepared* directory is what the model-source step (``make model``,
:mod:`aifn.build.model_source`) or ``make train`` writes: the model's ``config.json`` and
``tokenizer.json``, the ONNX graphs the build exported (:mod:`aifn.build.export`:
``onnx/model.onnx`` in float32, and the int8 plan the build measured and chose, if any) and the
build record ``aifn-model.json``. Serving imports neither torch nor transformers: the graph runs
on ONNX Runtime and the tokenizer on ``tokenizers``.

**Each text runs alone**: one forward pass per text, with no padding and no batch-mates. A
text's scores are then a function of the text alone, whatever else was queued beside it, and
with int8 graphs that is not a detail: dynamic quantization scales a layer's input by the largest
value in the whole batch, so a shared pass would let one request move another's scores. Measured
on 2 vCPUs, a text alone runs as many texts/s per core as batches of 32 do (docs/performance.md),
so nothing is traded for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from aifn.core.errors import ConfigError

log = logging.getLogger(__name__)

BUILD_INFO = "aifn-model.json"
# The float32 graph every prepared directory has, and where an int8 plan's graph is written.
FLOAT32_GRAPH = "onnx/model.onnx"
# Files besides the graph that decide what the model answers; with the served graph's bytes they
# make up its revision hash.
IDENTITY_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
AUTO, OFF = "auto", "off"
QUANTIZE_CHOICES = (AUTO, OFF)
_PLAN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


def plan_graph(plan: str | None) -> str:
    """The graph file of an int8 plan (``None``: the float32 graph), relative to the directory."""
    return FLOAT32_GRAPH if plan is None else f"onnx/model.{plan}.onnx"


def parse_quantize(raw: str) -> str:
    """Parse ``QUANTIZE``: ``auto`` or ``off``."""
    value = raw.strip().lower()
    if value not in QUANTIZE_CHOICES:
        raise ValueError(f"must be one of {', '.join(QUANTIZE_CHOICES)}")
    return value


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


def read_config(path: Path) -> dict[str, Any]:
    """A model directory's ``config.json``, checked for what serving and export read from it.

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
        try:
            ids = sorted(int(k) for k in id2label)
        except ValueError:
            raise ConfigError(f"{config_path}: id2label keys must be label ids") from None
        if ids != list(range(len(ids))):
            raise ConfigError(f"{config_path}: id2label must number its labels 0..{len(ids) - 1}")
    else:
        _check_pooling(path)
    return config


def check_model_dir(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a prepared directory serving can load; return its ``config.json``.

    Raises:
        ConfigError: With a message saying what is missing or wrong, and how to prepare one.
    """
    config = read_config(path)
    plan = recorded_plan(path)
    if not (path / FLOAT32_GRAPH).is_file() and not (plan and (path / plan_graph(plan)).is_file()):
        raise ConfigError(
            f"{path} has no {FLOAT32_GRAPH}: it is not a prepared model directory. Models are "
            "exported to ONNX at build time: `python -m aifn.build.model_source --source "
            f"{path} --dest DIR` (or `make model`) prepares one"
        )
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(
            f"{path} has no tokenizer.json; the model-source step writes one when it prepares "
            "a directory"
        )
    return config


def one_line(exc: BaseException) -> str:
    """An exception as one line (the libraries' messages span several)."""
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


def content_hash(path: Path, graph: str = FLOAT32_GRAPH) -> str:
    """SHA-256 over the files that decide the answers and the served ``graph``.

    As ``sha256:<first 16 hex digits>``. An int8 graph is its own revision (and cache space):
    its scores differ slightly from float32's.
    """
    files = [path / name for name in (*IDENTITY_FILES, graph) if (path / name).is_file()]
    return f"sha256:{hash_files(path, files)[:16]}"


def read_info(path: Path) -> dict[str, Any] | None:
    """The build record ``aifn-model.json``, or None if absent or unreadable."""
    try:
        info = json.loads((path / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def recorded_plan(path: Path) -> str | None:
    """The int8 plan the model's build chose (``aifn-model.json``), or None for float32."""
    metrics = (read_info(path) or {}).get("metrics")
    decision = metrics.get("quantization") if isinstance(metrics, dict) else None
    plan = decision.get("chosen") if isinstance(decision, dict) else None
    return plan if isinstance(plan, str) and _PLAN_NAME.match(plan) else None


def served_graph(path: Path, quantize: str) -> tuple[str, str | None]:
    """(graph file, plan) serving loads for ``QUANTIZE=quantize``; plan None means float32.

    Raises:
        ConfigError: The build chose a plan whose graph is missing from the directory.
    """
    plan = recorded_plan(path) if quantize == AUTO else None
    graph = plan_graph(plan)
    if plan is None and not (path / graph).is_file():
        raise ConfigError(
            f"{path} has no {FLOAT32_GRAPH}, the float32 graph QUANTIZE={quantize} serves; "
            "a directory copied for serving holds only the graph QUANTIZE=auto serves"
        )
    if not (path / graph).is_file():
        raise ConfigError(
            f"{path / BUILD_INFO} says serving runs the {plan} graph, but {path / graph} is "
            "missing; prepare the directory again, or set QUANTIZE=off to serve float32"
        )
    return graph, plan


def model_name(path: Path, config: dict[str, Any]) -> str:
    """The name recorded by the model-source step, else the config's, else the directory's."""
    name = (read_info(path) or {}).get("name")
    if isinstance(name, str) and name:
        return name
    name = config.get("_name_or_path")
    if isinstance(name, str) and name and not os.path.isabs(name):
        return name
    return path.resolve().name


class Tokenizer:
    """A directory's ``tokenizer.json`` (run by ``tokenizers``), truncating at ``max_tokens``.

    Its settings are fixed here and never changed afterwards, so it is safe to call from
    several threads at once. Texts are never padded: each runs alone.
    """

    def __init__(self, path: Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_tokens)

    def encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
        """Per text: its token ids and token type ids, each ``(1, tokens)``, and truncation."""
        if len(texts) == 1:
            encodings = [self._tokenizer.encode(texts[0])]
        else:
            encodings = self._tokenizer.encode_batch(list(texts))
        return [
            (
                np.asarray([e.ids], dtype=np.int64),
                np.asarray([e.type_ids], dtype=np.int64),
                bool(e.overflowing),
            )
            for e in encodings
        ]


def _tokenizer_config(path: Path) -> dict[str, Any]:
    """``tokenizer_config.json``, or nothing if there is none (or it is not a JSON object)."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_max_length(path: Path) -> int | None:
    """The longest input ``tokenizer_config.json`` allows, if it says."""
    value = _tokenizer_config(path).get("model_max_length")
    return value if isinstance(value, int) and value > 0 else None


def session_options(threads: int) -> Any:
    """ONNX Runtime options for serving: ``threads`` intra-op threads, never spinning.

    Spinning (a pool thread busy-waiting for the next operator) is off: on Cloud Run every
    CPU-second is billed, and measured here it bought nothing at one or two threads. With one
    thread the caller's own thread runs the graph, so each model worker computes on its core.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about graphs, not requests
    return options


class _OnnxModel:
    """An exported model, its tokenizer and its limits; runs each text alone.

    Forward passes may run from several threads at once (the batcher's workers): ONNX Runtime
    sessions are safe to run concurrently, each run on its caller's thread.
    """

    kind: ClassVar[str]
    output: ClassVar[str]

    def __init__(
        self,
        session: Any,
        tokenizer: Tokenizer,
        identity: ModelIdentity,
        config: dict[str, Any],
        *,
        max_tokens: int,
        plan: str | None = None,
    ) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._config = config
        self.identity = identity
        self.max_tokens = max_tokens
        # The int8 plan this graph is (None: float32).
        self.plan = plan
        self._inputs = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._inputs
        if missing:
            raise ConfigError(f"the ONNX graph has no input {', '.join(sorted(missing))}")
        if self.output not in {o.name for o in session.get_outputs()}:
            raise ConfigError(
                f"the ONNX graph has no output {self.output!r}; it was not exported for a "
                f"{self.kind}"
            )
        self.ready = False

    @property
    def labels(self) -> list[str]:
        """The model's fixed labels, in id order; empty for an encoder."""
        return []

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        max_tokens: int,
        threads: int = 1,
        quantize: str = AUTO,
        graph: str | None = None,
    ) -> Self:
        """Load the prepared model in ``path`` (offline) and warm it up.

        ``quantize`` is ``QUANTIZE``'s value: ``auto`` runs the int8 graph the build measured and
        chose, if any, ``off`` the float32 graph. ``graph`` (a file in ``path``) overrides it:
        the build measures each candidate that way.

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
        if graph is None:
            graph, plan = served_graph(path, quantize)
        else:
            plan = graph.removeprefix("onnx/model.").removesuffix(".onnx")
            plan = None if graph == FLOAT32_GRAPH else plan
        limit = min(
            max_tokens,
            config.get("max_position_embeddings") or max_tokens,
            model_max_length(path) or max_tokens,
        )
        try:
            tokenizer = Tokenizer(path, limit)
        except Exception as exc:
            raise ConfigError(f"could not load the tokenizer in {path}: {one_line(exc)}") from exc
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(
                str(path / graph), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ConfigError(
                f"could not load the ONNX graph {path / graph}: {one_line(exc)}"
            ) from exc
        identity = ModelIdentity(model_name(path, config), content_hash(path, graph))
        loaded = cls(session, tokenizer, identity, config, max_tokens=limit, plan=plan)
        loaded.warm_up()
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": identity.to_json(),
                    "kind": cls.kind,
                    "labels": loaded.labels,
                    "load_seconds": round(time.perf_counter() - started, 3),
                    "graph": graph,
                    "quantization": plan or "float32",
                    "intra_op_threads": threads,
                    "max_tokens": limit,
                }
            },
        )
        return loaded

    def warm_up(self) -> None:
        """Run one short and one full-length text, and check what the graph returns.

        Raises:
            ConfigError: The graph fails, or its output does not fit the model's config.
        """
        try:
            rows, _ = self.forward(["warm-up", "warm " * self.max_tokens])
        except Exception as exc:
            raise ConfigError(f"the ONNX graph fails on a test input: {one_line(exc)}") from exc
        self._check_output(rows[0])
        self.ready = True

    def _check_output(self, row: np.ndarray) -> None:
        if row.ndim != 1 or not np.isfinite(row).all():
            raise ConfigError(f"the ONNX graph's {self.output!r} is not a finite vector per text")

    def forward(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[bool]]:
        """Run each text alone; its output row and truncation, in input order."""
        rows: list[np.ndarray] = []
        truncated: list[bool] = []
        for ids, type_ids, cut in self._tokenizer.encode(texts):
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = type_ids
            rows.append(self._session.run([self.output], feeds)[0][0])
            truncated.append(cut)
        return rows, truncated


class TextClassifier(_OnnxModel):
    """A sequence-classification model: each text gets a probability for each of its labels."""

    kind = CLASSIFIER
    output = "probabilities"

    @functools.cached_property
    def labels(self) -> list[str]:
        """The model's labels, in id order (its ``config.id2label``)."""
        id2label = {int(k): str(v) for k, v in self._config["id2label"].items()}
        return [id2label[i] for i in range(len(id2label))]

    def _check_output(self, row: np.ndarray) -> None:
        super()._check_output(row)
        if row.shape[0] != len(self.labels):
            raise ConfigError(
                f"the ONNX graph scores {row.shape[0]} labels, but config.json's id2label has "
                f"{len(self.labels)}: the graph and the config are from different models"
            )

    def probabilities(self, texts: Sequence[str]) -> tuple[list[list[float]], list[bool]]:
        """Each text's probability per label (in :attr:`labels` order) and its truncation."""
        rows, truncated = self.forward(texts)
        return [row.tolist() for row in rows], truncated

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


class TextEncoder(_OnnxModel):
    """A sentence encoder: each text becomes a unit-length vector (mean of its token states).

    Cosine similarity between two texts is the dot product of their vectors.
    """

    kind = ENCODER
    output = "embeddings"

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """A ``(len(texts), dim)`` float32 array of unit-length embeddings, and each truncation."""
        rows, truncated = self.forward(texts)
        return np.stack(rows), truncated

    def rows(self, texts: Sequence[str]) -> list[tuple[np.ndarray, bool]]:
        """One ``(embedding, truncated)`` pair per text (what the batcher hands out)."""
        rows, truncated = self.forward(texts)
        return list(zip(rows, truncated, strict=True))


def rank(labels: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """Pair labels with scores, highest score first (ties keep label order)."""
    return sorted(zip(labels, scores, strict=True), key=lambda p: p[1], reverse=True)


def load_model(
    path: Path,
    *,
    max_tokens: int,
    threads: int,
    kinds: Sequence[str],
    quantize: str = AUTO,
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
    return cls.load(path, max_tokens=max_tokens, threads=threads, quantize=quantize)
