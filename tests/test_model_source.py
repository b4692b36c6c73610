"""The model-source step: spec parsing, local and gs:// sources (real emulator), caching, and
atomic replacement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from aifn.build import model_source
from aifn.core.errors import ConfigError
from aifn.core.model import BUILD_INFO, FLOAT32_GRAPH, TextClassifier, content_hash, served_graph

pytestmark = pytest.mark.integration

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.mark.parametrize(
    ("spec", "kind", "location", "revision"),
    [
        ("recipe:functions/sentiment/recipe.py", "recipe", "functions/sentiment/recipe.py", None),
        ("gs://bucket/models/sentiment", "gcs", "bucket/models/sentiment", None),
        ("gs://bucket/models/sentiment/", "gcs", "bucket/models/sentiment", None),
        (
            "hf://org/model@0123456789abcdef0123456789abcdef01234567",
            "hf",
            "org/model",
            "0123456789abcdef0123456789abcdef01234567",
        ),
        ("/srv/model", "local", "/srv/model", None),
        ("file:///srv/model", "local", "/srv/model", None),
    ],
)
def test_parse(spec: str, kind: str, location: str, revision: str | None) -> None:
    source = model_source.parse(spec)
    assert (source.kind, source.location, source.revision) == (kind, location, revision)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf://org/model", "pinned revision"),
        ("hf://org/model@", "pinned revision"),
        ("recipe:train.sh", ".py file"),
        ("gs://", "expected gs://bucket/prefix"),
        ("", "empty model source"),
    ],
)
def test_parse_rejects(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_source.parse(spec)


def _copy_model(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in os.listdir(src):
        if (src / name).is_file() and name != BUILD_INFO:
            shutil.copy2(src / name, dest / name)
    return dest


def test_local_source_is_copied_exported_then_cached(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    src = _copy_model(sentiment_model_dir, tmp_path / "src")  # the Hugging Face files only
    dest = tmp_path / "models" / "sentiment"
    first = model_source.prepare(str(src), dest)
    assert first["cached"] is False
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    # Exported at build time, in float32: a local directory brings no held-out data for plans.
    assert first["metrics"]["onnx"]["max_abs_difference"] <= 1e-4
    assert "quantization" not in first["metrics"]
    info = json.loads((dest / BUILD_INFO).read_text())
    assert info["source"] == str(src)
    assert model_source.prepare(str(src), dest)["cached"] is True
    # A changed input is a new fingerprint: rebuilt.
    (src / "tokenizer_config.json").write_text(
        (src / "tokenizer_config.json").read_text().replace("}", ', "x_note": 1}', 1)
    )
    assert model_source.prepare(str(src), dest)["cached"] is False


def test_a_prepared_local_model_keeps_its_name_figures_and_graphs(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    # What the container's model stage does with models/<function>: the copy must serve the same
    # model and keep the build record's figures (they carry QUANTIZE=auto's int8 plan).
    src = tmp_path / "sentiment"
    shutil.copytree(sentiment_model_dir, src)
    record = json.loads((src / BUILD_INFO).read_text())
    record["name"] = "aifn-sentiment-test"
    (src / BUILD_INFO).write_text(json.dumps(record))
    dest = tmp_path / "image" / "model"
    model_source.prepare(str(src), dest)
    info = json.loads((dest / BUILD_INFO).read_text())
    assert info["name"] == "aifn-sentiment-test"
    assert info["metrics"] == record["metrics"]
    assert info["source"] == str(src)
    original = TextClassifier.load(sentiment_model_dir, max_tokens=64, threads=1)
    loaded = TextClassifier.load(dest, max_tokens=64, threads=1)
    assert loaded.identity.name == "aifn-sentiment-test"
    assert loaded.identity.revision == original.identity.revision
    assert loaded.plan == original.plan is not None


def test_a_serving_copy_holds_only_what_serving_reads(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    """What the image gets: no safetensors weights, no float32 graph next to the int8 one."""
    dest = tmp_path / "model"
    files = model_source.serving_copy(sentiment_model_dir, dest)
    graph, plan = served_graph(sentiment_model_dir, "auto")
    assert plan is not None
    assert graph in files
    assert "model.safetensors" not in files
    assert FLOAT32_GRAPH not in files
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(files)
    original = TextClassifier.load(sentiment_model_dir, max_tokens=64, threads=1)
    copy = TextClassifier.load(dest, max_tokens=64, threads=1)
    assert copy.identity == original.identity
    text = ["The delivery was late again."]
    assert copy.probabilities(text) == original.probabilities(text)
    # Asked for float32, the copy says what is missing instead of serving something else.
    with pytest.raises(ConfigError, match=r"has no onnx/model\.onnx"):
        TextClassifier.load(dest, max_tokens=64, quantize="off")


def test_a_failing_build_leaves_the_previous_model_untouched(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    src = _copy_model(sentiment_model_dir, tmp_path / "src")
    dest = tmp_path / "dest"
    model_source.prepare(str(src), dest)
    before = content_hash(dest)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"id2label": {"0": "A", "1": "B"}}')  # no weights
    with pytest.raises(ConfigError, match=r"no model\.safetensors"):
        model_source.prepare(str(broken), dest)
    assert content_hash(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "dest", "src"]


def test_a_failing_recipe_leaves_no_partial_directory(tmp_path: Path) -> None:
    recipe = tmp_path / "bad_recipe.py"
    recipe.write_text(
        "NAME = 'bad'\n"
        "def fingerprint():\n    return {'v': 1}\n"
        "def build(dest):\n"
        "    (dest / 'config.json').write_text('{}')\n"
        "    raise RuntimeError('disk full')\n"
    )
    dest = tmp_path / "models" / "bad"
    with pytest.raises(RuntimeError, match="disk full"):
        model_source.prepare(f"recipe:{recipe}", dest)
    assert not dest.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_gcs_source_against_the_emulator(
    sentiment_model_dir: Path, storage_emulator: str, tmp_path: Path
) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator
    from google.cloud import storage

    client = storage.Client(project="test")
    bucket = client.create_bucket("aifn-models")
    for name in MODEL_FILES:
        bucket.blob(f"sentiment/v1/{name}").upload_from_filename(str(sentiment_model_dir / name))
    bucket.blob("sentiment/v1-other/config.json").upload_from_string("{}")  # same prefix start

    dest = tmp_path / "models" / "sentiment"
    first = model_source.prepare("gs://aifn-models/sentiment/v1", dest)
    assert first["cached"] is False
    assert sorted(p.name for p in dest.iterdir()) == sorted([*MODEL_FILES, BUILD_INFO, "onnx"])
    # Exported here from the same weights by the same code: the recipe's float32 graph, to the byte.
    assert content_hash(dest) == content_hash(sentiment_model_dir)

    # Nothing changed in the bucket: nothing is downloaded again.
    assert model_source.prepare("gs://aifn-models/sentiment/v1", dest)["cached"] is True

    model = TextClassifier.load(dest, max_tokens=64, threads=1)
    (pred,) = model.predict(["What a wonderful, joyful day!"])
    assert pred.label == "POSITIVE"

    # A new object version changes the fingerprint.
    bucket.blob("sentiment/v1/tokenizer_config.json").upload_from_string(
        (sentiment_model_dir / "tokenizer_config.json").read_text().replace("}", ', "v": 2}', 1)
    )
    assert model_source.prepare("gs://aifn-models/sentiment/v1", dest)["cached"] is False


def test_gcs_empty_prefix_is_a_clear_error(storage_emulator: str, tmp_path: Path) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = storage_emulator
    from google.cloud import storage

    storage.Client(project="test").create_bucket("aifn-empty")
    with pytest.raises(ConfigError, match="no objects under gs://aifn-empty/nothing/"):
        model_source.prepare("gs://aifn-empty/nothing", tmp_path / "m")


def test_cli_reports_cached_model(sentiment_model_dir: Path, tmp_path: Path, capsys) -> None:
    src = _copy_model(sentiment_model_dir, tmp_path / "src")
    dest = tmp_path / "dest"
    assert model_source.main(["--source", str(src), "--dest", str(dest)]) == 0
    assert model_source.main(["--source", str(src), "--dest", str(dest)]) == 0
    assert "up to date (cached)" in capsys.readouterr().out
    assert model_source.main(["--source", "hf://x/y", "--dest", str(dest)]) == 2
