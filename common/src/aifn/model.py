"""A text classifier loaded from a local Hugging Face directory: load, warm up, predict.

Lists in, lists out: :meth:`TextClassifier.predict` always takes a list; a single text is a list of
one. The model is loaded once per process, before the port opens, and never from the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifn.errors import ConfigError

log = logging.getLogger(__name__)

# Files that define a model's behaviour; their bytes make up its revision hash.
_IDENTITY_FILES = (
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
class Prediction:
    """One text's result: the top label, every label ranked by score, and truncation."""

    labels: list[tuple[str, float]]
    truncated: bool

    @property
    def label(self) -> str:
        return self.labels[0][0]

    @property
    def score(self) -> float:
        return self.labels[0][1]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 6),
            "labels": [{"label": lbl, "score": round(s, 6)} for lbl, s in self.labels],
            "truncated": self.truncated,
        }


def check_model_dir(path: Path) -> dict[str, Any]:
    """Check that ``path`` holds a loadable classifier and return its ``config.json``.

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
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) < 2:
        raise ConfigError(f"{config_path} has no id2label with at least two labels")
    if not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"{path} has no model.safetensors; only safetensors weights are loaded "
            "(pickled .bin weights can run code)"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ConfigError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)")
    return config


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
    files = [path / name for name in _IDENTITY_FILES if (path / name).is_file()]
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


class TextClassifier:
    """A sequence-classification model and its tokenizer, serving one batch at a time.

    Inference is serialised by a lock: on a small instance, concurrent forward passes only fight
    over the same cores, and one pass at a time keeps latency predictable.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        identity: ModelIdentity,
        *,
        max_tokens: int,
        batch_size: int,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self.identity = identity
        self.labels: list[str] = [
            model.config.id2label[i] for i in range(len(model.config.id2label))
        ]
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.ready = False

    @classmethod
    def load(cls, path: Path, *, max_tokens: int, batch_size: int, threads: int) -> TextClassifier:
        """Load the model in ``path`` (offline), then warm it up.

        Raises:
            ConfigError: The directory is missing or not a usable classifier.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        config = check_model_dir(path)
        started = time.perf_counter()

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers import logging as hf_logging

        torch.set_num_threads(threads)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, use_safetensors=True
            )
        except Exception as exc:  # the libraries raise many types for one cause: a bad directory
            raise ConfigError(f"could not load the model in {path}: {exc}") from exc
        model.eval()
        limit = min(
            max_tokens,
            getattr(model.config, "max_position_embeddings", max_tokens),
            getattr(tokenizer, "model_max_length", max_tokens) or max_tokens,
        )
        identity = ModelIdentity(model_name(path, config), content_hash(path))
        classifier = cls(model, tokenizer, identity, max_tokens=limit, batch_size=batch_size)
        classifier.warm_up()
        log.info(
            "model loaded",
            extra={
                "fields": {
                    "model": identity.to_json(),
                    "labels": classifier.labels,
                    "load_seconds": round(time.perf_counter() - started, 3),
                    "torch_threads": threads,
                    "max_tokens": limit,
                }
            },
        )
        return classifier

    def warm_up(self) -> None:
        """Run one short and one full-length inference so the first request pays no set-up."""
        self.predict(["warm-up", "warm " * self.max_tokens])
        self.ready = True

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Classify every text; results are in input order."""
        results: list[Prediction | None] = [None] * len(texts)
        # Sorting by length before chunking keeps padding (wasted compute) small.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            with self._lock:
                probs, truncated = self._run([texts[i] for i in idx])
            for pos, i in enumerate(idx):
                ranked = sorted(
                    zip(self.labels, probs[pos], strict=True), key=lambda p: p[1], reverse=True
                )
                results[i] = Prediction(labels=ranked, truncated=truncated[pos])
        return [r for r in results if r is not None]

    def _run(self, texts: list[str]) -> tuple[list[list[float]], list[bool]]:
        """Tokenize and classify one chunk; the caller holds the lock.

        The fast tokenizer is not safe to call from several threads at once (truncation and
        padding settings live in shared Rust state: "Already borrowed"), so tokenization runs
        under the same lock as the forward pass.
        """
        import torch

        enc = self._tokenizer(
            texts,
            truncation=True,
            max_length=self.max_tokens,
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
        )
        # Overflow rows (the truncated-away tail of a long text) tell us what was truncated;
        # only each text's first row is classified.
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
        with torch.inference_mode():
            probs = torch.softmax(self._model(**inputs).logits.float(), dim=-1).tolist()
        return probs, truncated
