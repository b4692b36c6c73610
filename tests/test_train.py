"""Fine-tuned mode: labelled file -> `python -m aifn.build.train` -> classify -> predictions.

A small file (120 short BBC snippets, 5 topics) trains in seconds and runs the whole path end to
end; the BBC acceptance figure (>= 0.95 on the 500 test articles) is checked on a full training
run, kept in `models/classify-bbc` and in the machine's prepared-model cache (a fresh machine
trains it from scratch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from aifn.build import train
from aifn.build.finetune import TRAINING_RECORD
from aifn.core.model import BUILD_INFO, FLOAT32_GRAPH, model_kind

from .helpers import REPO, function_app

CLASSIFY = REPO / "functions" / "classify"
BBC_MODEL = REPO / "models" / "classify-bbc"
TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
SMALL_ARGS = ["--epochs", "4", "--batch-size", "8", "--max-length", "64"]

sys.path.insert(0, str(CLASSIFY))
import bbc  # noqa: E402


@pytest.fixture(scope="module")
def bbc_split() -> tuple[list[bbc.Article], list[bbc.Article]]:
    return bbc.split(bbc.load())


@pytest.fixture(scope="module")
def small_file(
    tmp_path_factory: pytest.TempPathFactory, bbc_split: tuple[list[bbc.Article], list]
) -> Path:
    """24 articles per topic from the dev split, cut to their first 40 words."""
    dev, _ = bbc_split
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    lines = []
    for topic in TOPICS:
        for a in [a for a in dev if a.label == topic][:24]:
            lines.append({"id": a.id, "text": " ".join(a.text.split()[:40]), "label": topic})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory, small_file: Path) -> Path:
    dest = tmp_path_factory.mktemp("models") / "news"
    assert train.main(["--data", str(small_file), "--dest", str(dest), *SMALL_ARGS]) == 0
    return dest


@pytest.fixture(scope="module")
def client(small_model: Path) -> Any:
    return function_app("classify", small_model)[0]


def test_training_writes_a_classifier_with_a_model_card(small_model: Path) -> None:
    config = json.loads((small_model / "config.json").read_text())
    assert model_kind(config) == "classifier"
    assert sorted(config["id2label"].values()) == TOPICS
    info = json.loads((small_model / BUILD_INFO).read_text())
    metrics = info["metrics"]
    assert metrics["train_n"] + metrics["test_n"] == 120
    assert 0 < metrics["test_n"] < 30  # about one text in ten is held out
    card = (small_model / "README.md").read_text()
    assert "# news\n" in card  # named after the --dest directory
    assert f"Accuracy **{metrics['accuracy']:.3f}**" in card


def test_second_run_with_the_same_inputs_is_cached(
    small_file: Path, small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (small_model / "model.safetensors").stat().st_mtime_ns
    assert train.main(["--data", str(small_file), "--dest", str(small_model), *SMALL_ARGS]) == 0
    assert "up to date (cached)" in capsys.readouterr().out
    assert (small_model / "model.safetensors").stat().st_mtime_ns == before


def test_served_model_answers_with_its_own_labels(client: Any) -> None:
    texts = [
        "Shares fell sharply after the company reported lower quarterly profits and sales.",
        "The striker scored twice as the club won the league match on Saturday.",
        "The prime minister told parliament the government would hold an election.",
    ]
    response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["mode"] == "fine-tuned"
    assert [r["label"] for r in body["results"]] == ["business", "sport", "politics"]
    for result in body["results"]:
        assert sorted(s["label"] for s in result["labels"]) == TOPICS
        assert sum(s["score"] for s in result["labels"]) == pytest.approx(1.0, abs=1e-4)
    health = client.get("/v1/health").get_json()
    assert health["kind"] == "classifier"
    assert health["labels"] == TOPICS


def test_labels_narrow_the_model_labels_and_renormalise(client: Any) -> None:
    text = "The striker scored twice as the club won the league match on Saturday."
    full = client.post("/v1/classify", json={"text": text}).get_json()["results"][0]
    narrow = client.post(
        "/v1/classify", json={"text": text, "labels": ["politics", "business"]}
    ).get_json()["results"][0]
    assert sorted(s["label"] for s in narrow["labels"]) == ["business", "politics"]
    # The cache keeps the full distribution, so narrowing is answered from it.
    assert narrow["cached"] is True
    assert sum(s["score"] for s in narrow["labels"]) == pytest.approx(1.0, abs=1e-4)
    scores = {s["label"]: s["score"] for s in full["labels"]}
    ratio = scores["politics"] / scores["business"]
    narrowed = {s["label"]: s["score"] for s in narrow["labels"]}
    assert narrowed["politics"] / narrowed["business"] == pytest.approx(ratio, rel=1e-3)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": "x", "labels": ["sport", "weather"]}, "does not know the labels ['weather']"),
        ({"text": "x", "labels": ["sport", "sport"]}, "labels must be unique"),
        ({"text": "x", "labels": ["sport"]}, "at least 2"),
        ({"text": "x", "descriptions": {"sport": "games"}}, "'descriptions' applies to zero-shot"),
        ({"text": "x", "multi_label": True}, "'multi_label' applies to zero-shot"),
        ({"text": "x", "template": "about {label}"}, "'template' applies to zero-shot"),
    ],
)
def test_fine_tuned_mode_rejects_what_it_cannot_honour(
    client: Any, body: dict[str, Any], fragment: str
) -> None:
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 422
    assert fragment in response.get_json()["error"]["message"]


def _write(path: Path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_bad_lines_are_all_reported_and_nothing_is_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(
        tmp_path / "bad.jsonl",
        '{"text": "fine", "label": "a"}\n'
        "not json\n"
        '{"text": "", "label": "a"}\n'
        "\n"
        '{"text": "no label"}\n'
        '["a", "list"]\n'
        '{"text": "ok", "label": 3}\n',
    )
    dest = tmp_path / "model"
    assert train.main(["--data", data, "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "4 bad line(s)" in err
    for fragment in (
        "line 2: not valid JSON",
        "line 3: 'text' is missing",
        "line 5: 'label' is missing",
        "line 6: not a JSON object",
    ):
        assert fragment in err
    assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("one.csv", "text,label\nhello,a\nworld,a\n", "at least two labels"),
        ("rare.csv", "text,label\nhello,a\nworld,a\nthere,b\n", "fewer than 2 training examples"),
        ("cols.csv", "body,topic\nhello,a\n", "has no column label, text"),
        ("data.txt", "hello\n", "unknown format '.txt'"),
        ("missing.jsonl", None, "no such file"),
    ],
)
def test_unusable_files_are_clear_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | None,
    fragment: str,
) -> None:
    data = str(tmp_path / name) if content is None else _write(tmp_path / name, content)
    assert train.main(["--data", data, "--dest", str(tmp_path / "m")]) == 2
    assert fragment in capsys.readouterr().err


def test_csv_with_custom_columns_and_quoted_commas(tmp_path: Path) -> None:
    rows = ['"Invoice wrong, charged twice",billing', '"Crash on start, again",bug'] * 3
    data = _write(tmp_path / "t.csv", "body,topic\n" + "\n".join(rows) + "\n")
    dataset = train.read_examples(data, text_key="body", label_key="topic", workdir=tmp_path)
    assert [(e.text, e.label) for e in dataset.examples[:2]] == [
        ("Invoice wrong, charged twice", "billing"),
        ("Crash on start, again", "bug"),
    ]


def test_duplicate_texts_never_straddle_the_split() -> None:
    text = "The same ticket, sent twice."
    assert train.held_out(text) == train.held_out("  the same  ticket, SENT twice. ")


def test_data_from_cloud_storage(storage_emulator: str, tmp_path: Path, small_file: Path) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator
    from google.cloud import storage

    bucket = storage.Client(project="test").create_bucket("aifn-training-data")
    bucket.blob("news/train.jsonl").upload_from_filename(str(small_file))
    dataset = train.read_examples("gs://aifn-training-data/news/train.jsonl", workdir=tmp_path)
    local = train.read_examples(str(small_file), workdir=tmp_path)
    assert dataset.examples == local.examples
    assert dataset.sha256 == local.sha256
    with pytest.raises(train.DataError, match="cannot download"):
        train.read_examples("gs://aifn-training-data/news/missing.jsonl", workdir=tmp_path)


def test_a_cached_model_is_byte_identical_to_a_rebuilt_one(
    small_file: Path, small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the prepared-model cache rests on: the same fingerprint trains the same bytes."""
    args = ["--data", str(small_file), *SMALL_ARGS, "--name", "news"]
    # Restored from the cache that small_model's training stored into.
    assert train.main([*args, "--dest", str(tmp_path / "restored")]) == 0
    restored = json.loads((tmp_path / "restored" / BUILD_INFO).read_text())
    assert "restored_from" not in restored  # the record on disk is the build's own
    # Trained again from scratch, with the cache out of the way.
    monkeypatch.setenv("AIFN_MODEL_CACHE", "off")
    assert train.main([*args, "--dest", str(tmp_path / "rebuilt")]) == 0
    rebuilt = json.loads((tmp_path / "rebuilt" / BUILD_INFO).read_text())
    assert rebuilt["fingerprint"] == restored["fingerprint"]
    assert rebuilt["prepared_at"] >= restored["prepared_at"]

    def files(path: Path) -> dict[str, bytes]:
        # Everything but the records of the build itself (its timings differ): the weights,
        # the tokenizer and config, and the exported graphs.
        return {
            str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in {BUILD_INFO, "README.md", TRAINING_RECORD}
        }

    cached, fresh = files(tmp_path / "restored"), files(tmp_path / "rebuilt")
    assert "model.safetensors" in cached
    assert FLOAT32_GRAPH in cached
    assert cached.keys() == fresh.keys()
    for name in cached:
        assert cached[name] == fresh[name], f"{name} differs between cached and rebuilt"
    assert files(small_model) == cached
    # The held-out figures too, and each plan's (not the timings: training seconds, texts/s).
    for figure in ("test_n", "accuracy", "macro_f1", "per_label"):
        assert rebuilt["metrics"][figure] == restored["metrics"][figure]
    for plans in (rebuilt, restored):
        for plan in plans["metrics"]["quantization"]["plans"]:
            del plan["texts_per_second"], plan["speedup"]
        del plans["metrics"]["quantization"]["float32"]["texts_per_second"]
    assert rebuilt["metrics"]["quantization"] == restored["metrics"]["quantization"]


@pytest.mark.slow
def test_bbc_fine_tune_reaches_the_bar(
    tmp_path: Path,
    bbc_split: tuple[list[bbc.Article], list[bbc.Article]],
    machine_model_cache: None,
) -> None:
    """The issue's figure: fine-tuned on the BBC dev split, >= 0.95 on the 500 test articles.

    Trained through the machine's prepared-model cache, as `make train` would: the same inputs
    on the same libraries give the same bytes (the test above), so after the first run on a
    machine the model and its recorded figures come from there.
    """
    dev, test = bbc_split
    bbc.write_jsonl(tmp_path / "train.jsonl", dev)
    bbc.write_jsonl(tmp_path / "test.jsonl", test)
    args = ["--data", str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "test.jsonl")]
    assert train.main([*args, "--dest", str(BBC_MODEL)]) == 0
    metrics = json.loads((BBC_MODEL / BUILD_INFO).read_text())["metrics"]
    assert metrics["test_n"] == 500
    assert metrics["train_n"] == 1725
    assert metrics["accuracy"] >= 0.95
    assert metrics["train_seconds"] <= 600


def test_openapi_document_names_the_model_labels(client: Any) -> None:
    doc = client.get("/openapi.json").get_json()
    schema = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert schema["required"] == []
    assert schema["properties"]["labels"]["items"]["enum"] == TOPICS
