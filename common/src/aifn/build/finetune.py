"""Fine-tune a sentence encoder into a fixed-label text classifier.

The recipe is deliberately small and deterministic: the same examples, configuration, library
versions and thread count give the same weights. It is shared by every capability that trains a
model (sentiment's default model, classify's fine-tuned mode); what differs between them is only
where the labelled examples come from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

# What a cached fine-tune (fine_tune_cached) records beside its weights.
TRAINING_RECORD = "aifn-training.json"


@dataclass(frozen=True)
class Example:
    """One labelled training or evaluation text."""

    text: str
    label: str


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a fine-tuning run; all of them are part of the recipe's fingerprint."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1.2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    seed: int = 13
    # Freeze the embeddings (half of MiniLM's parameters) and this many of the lowest encoder
    # layers. On 2 CPU cores this is what makes two epochs fit in the 10-minute budget: a step
    # costs ~30% less, and the frozen low layers hold general-purpose features anyway.
    freeze_embeddings: bool = True
    freeze_layers: int = 3
    # "mean": append a fixed encoder layer whose [CLS] output is the layer-normalised mean of all
    # token states (see append_mean_pooling_layer), so the standard classification head reads
    # the pooling the sentence encoder was trained for; "cls": the head reads [CLS] as usual.
    pooling: Literal["mean", "cls"] = "mean"
    # Dropout for the fine-tune (None keeps the checkpoint's). Off by default: two epochs do not
    # overfit 20k examples, and dropout costs ~12% of a CPU step.
    dropout: float | None = 0.0
    # Cap on training examples, for quick smoke runs of the recipe's code path; None trains on all.
    max_train_examples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _progress_kwargs() -> dict[str, Any]:
    # On a terminal the bar redraws in place; in CI logs it prints a line every 15 s instead of
    # flooding the log.
    interactive = sys.stderr.isatty()
    return {"file": sys.stderr, "mininterval": 0.5 if interactive else 15.0, "dynamic_ncols": True}


def _length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches so each batch has similar lengths.

    Padding is what makes small-batch CPU training slow; grouping by length cuts it by more than
    half on short texts while keeping the batch order random.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def train_threads() -> int:
    """The intra-op threads every fine-tune runs with: one per CPU this process may use.

    Fixed here rather than inherited from whatever the process set before, because the thread
    count changes the order of floating-point sums and so the weights' last bits. It is part of
    every trainer's fingerprint.
    """
    from aifn.settings import cpu_count

    return cpu_count()


def fine_tune(
    base_dir: Path,
    train: Sequence[Example],
    labels: Sequence[str],
    config: TrainConfig,
    *,
    description: str = "training",
) -> tuple[Any, Any]:
    """Fine-tune the encoder in ``base_dir`` on ``train``, with :func:`train_threads` threads.

    Args:
        base_dir: A Hugging Face model directory holding a BERT-style encoder and its tokenizer.
        train: Labelled examples; every label must be in ``labels``.
        labels: The classifier's labels, in id order.
        config: Hyper-parameters.
        description: Label for the progress bar.

    Returns:
        The trained model (in eval mode) and its tokenizer.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(train_threads())
    try:
        return _fine_tune(base_dir, train, labels, config, description)
    finally:
        torch.set_num_threads(saved)


def fine_tune_cached(
    dest: Path,
    base_dir: Path,
    train: Sequence[Example],
    labels: Sequence[str],
    config: TrainConfig,
    *,
    name: str,
    fingerprint: dict[str, Any],
    description: str = "training",
) -> dict[str, Any]:
    """:func:`fine_tune` into the empty directory ``dest``, through the prepared-model cache.

    The fine-tuned directory (weights, config, tokenizer) is cached under ``fingerprint``, which
    must cover everything training depends on and nothing after it: then a change to the export
    or its measurements (:mod:`aifn.build.export`) rebuilds from the cached weights in seconds
    instead of training again for minutes. Returns the training's record (seconds, threads), as
    first measured, with ``"restored": True`` when it came from the cache.
    """
    from aifn.build import model_cache

    cache = model_cache.ModelCache.from_env()
    key = model_cache.key(f"{name}:fine-tuned", fingerprint)
    with cache.locked(key) if cache is not None else contextlib.nullcontext():
        if cache is not None:
            if cache.restore(key, dest) is not None:
                record = json.loads((dest / TRAINING_RECORD).read_text(encoding="utf-8"))
                return {**record, "restored": True}
            shutil.rmtree(dest)
            dest.mkdir()
        clock = Stopwatch()
        model, tokenizer = fine_tune(base_dir, train, labels, config, description=description)
        record = {"train_seconds": round(clock.seconds, 1), "threads": train_threads()}
        save_model(model, tokenizer, dest)
        write_json(dest / TRAINING_RECORD, record)
        if cache is not None:
            cache.store(key, dest)
    return {**record, "restored": False}


def _fine_tune(
    base_dir: Path,
    train: Sequence[Example],
    labels: Sequence[str],
    config: TrainConfig,
    description: str,
) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    label2id = {label: i for i, label in enumerate(labels)}
    unknown = {ex.label for ex in train} - label2id.keys()
    if unknown:
        raise ValueError(f"training examples use labels not in {list(labels)}: {sorted(unknown)}")

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    examples = list(train)
    if config.max_train_examples is not None and len(examples) > config.max_train_examples:
        examples = rng.sample(examples, config.max_train_examples)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        overrides: dict[str, Any] = {}
        if config.dropout is not None:
            overrides = {
                "hidden_dropout_prob": config.dropout,
                "attention_probs_dropout_prob": config.dropout,
            }
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label2id,
            **overrides,
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    _freeze(model, embeddings=config.freeze_embeddings, layers=config.freeze_layers)
    if config.pooling == "mean":
        append_mean_pooling_layer(model)
    elif config.pooling != "cls":
        raise ValueError(f"pooling must be 'mean' or 'cls', not {config.pooling!r}")

    encoded = tokenizer(
        [ex.text for ex in examples], truncation=True, max_length=config.max_length
    )["input_ids"]
    targets = torch.tensor([label2id[ex.label] for ex in examples])
    lengths = [len(ids) for ids in encoded]

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * config.warmup_ratio))
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for n, p in trainable if not n.endswith(no_decay)],
            "weight_decay": config.weight_decay,
        },
        {"params": [p for n, p in trainable if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    pad_id = tokenizer.pad_token_id or 0

    model.train()
    step = 0
    with tqdm(total=total_steps, desc=description, unit="step", **_progress_kwargs()) as bar:
        for epoch in range(config.epochs):
            for batch in _length_grouped_batches(lengths, config.batch_size, rng):
                width = max(lengths[i] for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : lengths[i]] = torch.tensor(encoded[i])
                    attention[row, : lengths[i]] = 1
                logits = model(input_ids=input_ids, attention_mask=attention).logits
                loss = torch.nn.functional.cross_entropy(logits, targets[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    model.eval()
    return model, tokenizer


# Scale of the mean in the pooling layer: the layer's residual adds [CLS]'s own state, which at
# 1/10,000 of the mean's weight is negligible once LayerNorm removes the scale.
_MEAN_SCALE = 10_000.0


def append_mean_pooling_layer(model: Any) -> None:
    """Append a frozen BERT layer that turns [CLS] into LayerNorm(mean of the token states).

    Sentence encoders such as all-MiniLM-L6-v2 are trained with mean pooling, but a standard
    ``BertForSequenceClassification`` head reads the [CLS] state. Rather than ship custom model
    code, this builds mean pooling out of a standard layer, so the result loads anywhere with
    ``AutoModelForSequenceClassification``: queries and keys are zero (every token gets the same
    attention score, so attention is a uniform average over the non-padding tokens), values and
    the attention output projection are (scaled) identities, and the feed-forward block adds
    zero. The layer is frozen; only the layers below and the head train.
    """
    import copy

    encoder = model.base_model.encoder
    layer = copy.deepcopy(encoder.layer[-1])
    hidden = model.config.hidden_size
    eye = torch.eye(hidden)
    with torch.no_grad():
        attn = layer.attention.self
        for linear in (attn.query, attn.key):
            linear.weight.zero_()
            linear.bias.zero_()
        attn.value.weight.copy_(eye * _MEAN_SCALE)
        attn.value.bias.zero_()
        layer.attention.output.dense.weight.copy_(eye)
        layer.attention.output.dense.bias.zero_()
        layer.output.dense.weight.zero_()
        layer.output.dense.bias.zero_()
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = len(encoder.layer)
    layer.requires_grad_(False)
    encoder.layer.append(layer)
    model.config.num_hidden_layers = len(encoder.layer)


def _freeze(model: Any, *, embeddings: bool, layers: int) -> None:
    """Freeze the embeddings and the lowest ``layers`` encoder layers (BERT-style models)."""
    base = model.base_model
    if embeddings:
        base.embeddings.requires_grad_(False)
    for layer in base.encoder.layer[:layers]:
        layer.requires_grad_(False)


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    if not y_true:
        raise ValueError("accuracy of an empty set")
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-label F1; a label never predicted nor present scores 0."""
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred, strict=True))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred, strict=True))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write a standard Hugging Face directory: config, tokenizer, safetensors weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class Stopwatch:
    """Wall-clock seconds since creation, for the model card's training-time figure."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start
