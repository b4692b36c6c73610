"""The build's ONNX export and int8 plans: what the graphs compute, which products each plan
quantizes, how the decision is recorded and reaches serving, and what serving imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aifn import settings
from aifn.build import export
from aifn.core.errors import ConfigError
from aifn.core.model import (
    BUILD_INFO,
    FLOAT32_GRAPH,
    TextClassifier,
    TextEncoder,
    parse_quantize,
    plan_graph,
    served_graph,
)

from .helpers import CLASSIFY_MODEL, REPO

TEXTS = [
    "I love this, it works perfectly!",
    "Terrible, it broke after a day.",
    "The package arrived on Tuesday.",
    "Customer service was polite but could not fix the billing error.",
    "Absolutely fantastic experience from start to finish.",
    "Worst purchase I have made this year.",
    "The screen is bright, although the battery drains fast.",
    "It does what it says.",
]


@pytest.fixture(scope="module")
def float_model(sentiment_model_dir: Path) -> TextClassifier:
    return TextClassifier.load(sentiment_model_dir, max_tokens=128, threads=1, quantize="off")


def _copy_with_record(src: Path, dest: Path, record: object) -> Path:
    """A model directory like ``src`` whose build record says ``record`` (files linked)."""
    dest.mkdir()
    for item in src.iterdir():
        if item.name != BUILD_INFO:
            (dest / item.name).symlink_to(item, target_is_directory=item.is_dir())
    if record is not None:
        (dest / BUILD_INFO).write_text(
            record if isinstance(record, str) else json.dumps(record), encoding="utf-8"
        )
    return dest


def _hf_copy(src: Path, dest: Path, without: tuple[str, ...] = ()) -> Path:
    """The Hugging Face files of ``src`` (no graphs, no build record) copied into ``dest``."""
    dest.mkdir()
    for item in src.iterdir():
        if item.is_file() and item.name not in (BUILD_INFO, *without):
            shutil.copy2(item, dest / item.name)
    pooling = src / "1_Pooling"
    if pooling.is_dir():
        shutil.copytree(pooling, dest / "1_Pooling")
    return dest


def test_the_graph_computes_what_the_trained_model_does(
    float_model: TextClassifier, sentiment_model_dir: Path
) -> None:
    """The pooling layer exported as a mean, the head, the softmax: transformers' own scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(sentiment_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(sentiment_model_dir)
    record = json.loads((sentiment_model_dir / BUILD_INFO).read_text())["metrics"]["onnx"]
    assert record["pooling_layer_as_mean"] is True
    assert record["max_abs_difference"] <= export.PARITY_TOLERANCE
    # A padded batch through transformers, each text alone through the graph.
    with torch.no_grad():
        enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
        want = torch.softmax(model(**enc).logits, dim=-1).numpy()
    got, _ = float_model.probabilities(TEXTS)
    assert np.abs(np.array(got) - want).max() < 1e-4
    # The exported encoder has one layer fewer than the directory's config: the mean is cheaper.
    assert model.config.num_hidden_layers == 7


def test_plans_quantize_the_weight_products_they_name(sentiment_model_dir: Path) -> None:
    nodes = export.quantizable(sentiment_model_dir / FLOAT32_GRAPH)
    products = nodes.products
    layers = 6  # the trained layers; the pooling layer is a mean in the graph, with no weights
    assert len(products) == 6 * layers, products  # query, key, value, output, ffn in, ffn out
    # Products of two activations (attention scores) are never among them.
    assert not [n for n in products if "MatMul_1" in n.rsplit("/", 1)[-1]]
    ffn_out = [n for n in products if "/output/dense/" in n and "/attention/" not in n]
    assert len(ffn_out) == layers
    selected = {plan: export.selected(plan, products) for plan in export.PLANS}
    assert selected["int8"] == products
    assert set(selected["int8-no-first-ffn-out"]) == set(products) - {ffn_out[0]}
    assert "layer.0/" in ffn_out[0]
    assert set(selected["int8-no-ffn-out"]) == set(products) - set(ffn_out)
    assert len(selected["int8-attention"]) == 4 * layers
    assert all("/attention/" in n for n in selected["int8-attention"])
    # Every plan stores the word embeddings in int8 too; the small position table stays float.
    tables = nodes.tables
    assert len(tables) == 1
    assert "word_embeddings" in tables[0]


def test_the_served_int8_graph_keeps_the_answers(
    float_model: TextClassifier, sentiment_model_dir: Path
) -> None:
    graph, plan = served_graph(sentiment_model_dir, "auto")
    assert plan in export.PLANS, "the sentiment build chose no int8 plan"
    served = TextClassifier.load(sentiment_model_dir, max_tokens=128, threads=1)
    assert served.plan == plan
    assert served.identity.revision != float_model.identity.revision  # its own cache space
    assert [p.label for p in served.predict(TEXTS)] == [p.label for p in float_model.predict(TEXTS)]
    for a, b in zip(served.predict(TEXTS), float_model.predict(TEXTS), strict=True):
        q, f = dict(a.labels), dict(b.labels)
        assert max(abs(q[k] - f[k]) for k in f) < 0.1
    # The graphs of the plans not chosen were deleted at build time.
    assert sorted(p.name for p in (sentiment_model_dir / "onnx").iterdir()) == sorted(
        {Path(FLOAT32_GRAPH).name, Path(graph).name}
    )


@pytest.mark.slow  # quantizes and measures four plans
def test_choose_takes_the_first_plan_within_the_tolerance(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(sentiment_model_dir / name, d / name)
    (d / "onnx").mkdir()
    shutil.copy2(sentiment_model_dir / FLOAT32_GRAPH, d / FLOAT32_GRAPH)

    def load(graph: str) -> TextClassifier:
        return TextClassifier.load(d, max_tokens=64, threads=1, graph=graph)

    reference = [p.label for p in load(FLOAT32_GRAPH).predict(TEXTS)]

    def agreement(model: TextClassifier) -> float:
        got = [p.label for p in model.predict(TEXTS)]
        return sum(g == r for g, r in zip(got, reference, strict=True)) / len(TEXTS)

    lenient = export.choose(d, agreement, metric="agreement", load=load, probe=TEXTS)
    assert lenient["float32"]["agreement"] == 1.0
    assert [p["plan"] for p in lenient["plans"]] == list(export.PLANS)
    assert lenient["chosen"] == "int8"  # all agree on these clear texts: the fastest wins
    assert (d / plan_graph("int8")).is_file()
    assert not (d / plan_graph("int8-attention")).exists()
    assert all(p["texts_per_second"] > 0 for p in lenient["plans"])
    assert "**int8**" in export.card_section(lenient)

    strict = export.choose(
        d,
        lambda m: agreement(m) - (0.5 if m.plan else 0.0),
        metric="agreement",
        load=load,
        probe=TEXTS,
        plans=["int8"],
    )
    # A plan that cost 50 points is refused, its graph deleted, and the card says float32.
    assert strict["chosen"] is None
    assert strict["plans"][0]["drop_points"] == pytest.approx(50.0)
    assert not (d / plan_graph("int8")).exists()
    assert "serving runs float32" in export.card_section(strict)


def test_auto_serves_what_the_build_recorded(sentiment_model_dir: Path, tmp_path: Path) -> None:
    plan = served_graph(sentiment_model_dir, "auto")[1]
    recorded = _copy_with_record(
        sentiment_model_dir, tmp_path / "a", {"metrics": {"quantization": {"chosen": plan}}}
    )
    assert served_graph(recorded, "auto") == (plan_graph(plan), plan)
    assert served_graph(recorded, "off") == (FLOAT32_GRAPH, None)
    for name, record in [
        ("none-chosen", {"metrics": {"quantization": {"chosen": None}}}),
        ("no-record", None),
        ("corrupt", "{not json"),
        ("a path, not a plan", {"metrics": {"quantization": {"chosen": "../../etc/x"}}}),
    ]:
        path = _copy_with_record(sentiment_model_dir, tmp_path / name, record)
        assert served_graph(path, "auto") == (FLOAT32_GRAPH, None), name
    missing = _copy_with_record(
        sentiment_model_dir, tmp_path / "gone", {"metrics": {"quantization": {"chosen": "int2"}}}
    )
    with pytest.raises(ConfigError, match=r"says serving runs the int2 graph, but .* is missing"):
        served_graph(missing, "auto")


def test_the_built_models_record_a_decision_within_half_a_point(
    sentiment_model_dir: Path,
) -> None:
    for model_dir in (sentiment_model_dir, CLASSIFY_MODEL):
        metrics = json.loads((model_dir / BUILD_INFO).read_text())["metrics"]
        assert metrics["onnx"]["max_abs_difference"] <= export.PARITY_TOLERANCE
        decision = metrics["quantization"]
        metric = decision["metric"]
        assert [p["plan"] for p in decision["plans"]] == list(export.PLANS)
        chosen = [p for p in decision["plans"] if p["plan"] == decision["chosen"]]
        if chosen:
            drop = decision["float32"][metric] - chosen[0][metric]
            assert drop * 100 <= export.TOLERANCE_POINTS + 1e-9
            # ...and it is the first plan in the list that qualifies.
            before = decision["plans"][: decision["plans"].index(chosen[0])]
            assert all(p["drop_points"] > export.TOLERANCE_POINTS for p in before)
        card = (model_dir / "README.md").read_text()
        assert "## Inference graphs (ONNX Runtime)" in card
        assert f"| float32 | {decision['float32'][metric]:.4f} |" in card


def _export_error(d: Path) -> str:
    with pytest.raises(ConfigError) as info:
        export.export(d)
    return str(info.value)


@pytest.mark.parametrize(
    "case",
    ["weights truncated", "classifier head missing", "config of another shape", "no weights"],
)
def test_a_model_that_cannot_be_exported_fails_the_build_saying_why(
    case: str, sentiment_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    d = _hf_copy(sentiment_model_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    if case == "weights truncated":
        weights.write_bytes(weights.read_bytes()[: 1 << 20])
        expected = f"could not load the weights {weights}"
    elif case == "classifier head missing":
        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if not k.startswith("classifier.")}, weights)
        expected = f"{weights} lacks 2 tensor(s) the model needs (classifier.bias"
    elif case == "config of another shape":
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))
        expected = f"{weights} does not match {d / 'config.json'}"
    else:
        weights.unlink()
        expected = f"{d} has no model.safetensors"
    assert expected in _export_error(d)
    assert not (d / FLOAT32_GRAPH).exists()


def test_an_encoder_exports_without_its_unused_pooler_and_matches_the_full_one(
    tmp_path: Path,
) -> None:
    """Mean pooling never reads BERT's pooler: its weights may be absent."""
    from safetensors.torch import load_file, save_file

    d = _hf_copy(CLASSIFY_MODEL, tmp_path / "m", without=("README.md",))
    tensors = load_file(d / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
    save_file(kept, d / "model.safetensors")
    assert (d / "vocab.txt").is_file()
    (d / "tokenizer.json").unlink()  # a directory with only a vocab.txt, as older models have
    record = export.export(d)
    assert record["output"] == "embeddings"
    assert record["pooling_layer_as_mean"] is False
    assert (d / "tokenizer.json").is_file()  # written for serving
    text = ["The match went to extra time and penalties."]
    full = TextEncoder.load(CLASSIFY_MODEL, max_tokens=64, quantize="off").embed(text)[0]
    stripped = TextEncoder.load(d, max_tokens=64).embed(text)[0]
    assert np.abs(full - stripped).max() < 1e-5


def test_serving_imports_neither_torch_nor_transformers(sentiment_model_dir: Path) -> None:
    probe = (
        "import sys, runpy\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "runpy.run_path(sys.argv[1] + '/main.py')\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'safetensors') "
        "if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    for function, model_dir in (("sentiment", sentiment_model_dir), ("classify", CLASSIFY_MODEL)):
        env = {**os.environ, "MODEL_DIR": str(model_dir), "METRICS": "off"}
        out = subprocess.run(
            [sys.executable, "-c", probe, str(REPO / "functions" / function)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        assert out.strip().splitlines()[-1] == "none", (function, out[-500:])


def test_quantize_setting_is_checked() -> None:
    assert parse_quantize(" Auto ") == "auto"
    assert parse_quantize("OFF") == "off"
    with pytest.raises(ValueError, match="auto, off"):
        parse_quantize("int8")


def test_cpu_count_honours_a_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert settings.cgroup_cpu_quota(str(cpu_max)) == 1.5
    cpu_max.write_text("max 100000\n")
    assert settings.cgroup_cpu_quota(str(cpu_max)) is None
    assert settings.cgroup_cpu_quota(str(tmp_path / "missing")) is None

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 0.5)
    assert settings.cpu_count() == 1
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 64.0)
    assert settings.cpu_count() == affinity
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: None)
    assert settings.machine_defaults() == {"model_workers": affinity}


def test_the_function_sizes_gunicorn_threads_before_gunicorn_starts(
    sentiment_model_dir: Path,
) -> None:
    import functions_framework

    os.environ.pop("THREADS", None)
    os.environ["MODEL_DIR"] = str(sentiment_model_dir)
    # One thread per request the model could hold: 256 queued texts + 2 workers x 32 running.
    os.environ.update(MAX_QUEUED_TEXTS="256", MODEL_WORKERS="2", INFERENCE_BATCH_SIZE="32")
    functions_framework.create_app(
        target="sentiment", source=str(REPO / "functions" / "sentiment" / "main.py")
    )
    # functions-framework reads THREADS after importing the function, when it builds gunicorn.
    assert os.environ["THREADS"] == "320"
