"""int8 dynamic quantization: which layers each plan touches, what it does to predictions, and
how the build-time decision reaches serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aifn import quantize, settings
from aifn.errors import ConfigError
from aifn.model import BUILD_INFO, TextClassifier

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
    return TextClassifier.load(
        sentiment_model_dir, max_tokens=128, batch_size=8, threads=2, quantize="off"
    )


def _copy_with_record(src: Path, dest: Path, record: object) -> Path:
    """A model directory like ``src`` whose build record says ``record`` (weights linked)."""
    dest.mkdir()
    for item in src.iterdir():
        if item.name != BUILD_INFO:
            (dest / item.name).symlink_to(item)
    if record is not None:
        (dest / BUILD_INFO).write_text(
            record if isinstance(record, str) else json.dumps(record), encoding="utf-8"
        )
    return dest


def test_plans_touch_the_layers_they_name_and_never_the_pooling_layer(
    float_model: TextClassifier,
) -> None:
    module = float_model.module
    last = len(module.base_model.encoder.layer) - 1  # the frozen mean-pooling layer
    everything = quantize.linear_layers(module, "int8")
    assert everything, "no linear layer found"
    assert not [n for n in everything if f"encoder.layer.{last}." in n]
    assert "classifier" in everything
    ffn_out = [n for n in everything if n.endswith("output.dense") and ".attention." not in n]
    assert len(ffn_out) == last  # one per trained layer
    assert set(quantize.linear_layers(module, "int8-no-ffn-out")) == set(everything) - set(ffn_out)
    attention = quantize.linear_layers(module, "int8-attention")
    assert attention
    assert all(".attention." in n for n in attention)
    assert len(attention) == 4 * last  # query, key, value, output per trained layer


def test_a_quantized_model_keeps_its_answers(
    float_model: TextClassifier, sentiment_model_dir: Path
) -> None:
    import torch

    want = float_model.predict(TEXTS)
    served = quantize.recorded_plan(sentiment_model_dir)
    assert served in quantize.PLANS, "the sentiment build recorded no int8 plan"
    for plan in quantize.PLANS:
        q = TextClassifier.load(
            sentiment_model_dir, max_tokens=128, batch_size=8, threads=2, quantize=plan
        )
        int8 = [
            n
            for n, m in q.module.named_modules()
            if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
        ]
        assert sorted(int8) == sorted(quantize.linear_layers(float_model.module, plan))
        assert q.identity.revision == float_model.identity.revision + f"+{plan}"
        got = q.predict(TEXTS)
        # Every plan keeps the label of these clear-cut texts...
        assert [p.label for p in got] == [p.label for p in want], plan
        if plan == served:
            # ...and the plan serving uses keeps every score close (the full int8 plan, which
            # the build refused, moves the mixed review's scores by ~0.4).
            for a, b in zip(got, want, strict=True):
                q_scores, f_scores = dict(a.labels), dict(b.labels)
                assert max(abs(q_scores[k] - f_scores[k]) for k in f_scores) < 0.1


@pytest.mark.slow  # every plan, evaluated and timed
def test_choose_takes_the_fastest_plan_within_the_tolerance(float_model: TextClassifier) -> None:
    reference = [p.label for p in float_model.predict(TEXTS)]

    def agreement(module: object) -> float:
        got = [p.label for p in float_model.with_module(module).predict(TEXTS)]
        return sum(g == r for g, r in zip(got, reference, strict=True)) / len(TEXTS)

    lenient = quantize.choose(float_model.module, agreement, metric="agreement")
    assert lenient["float32"]["agreement"] == 1.0
    assert [p["plan"] for p in lenient["plans"]] == list(quantize.PLANS)
    assert lenient["chosen"] == "int8"  # all agree on these clear texts: the fastest wins
    # The float model itself is untouched by the measurement.
    assert quantize.linear_layers(float_model.module, "int8")
    assert [p.label for p in float_model.predict(TEXTS)] == reference

    import torch

    def quantized(module: torch.nn.Module) -> bool:
        return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in module.modules())

    strict = quantize.choose(
        float_model.module,
        lambda m: agreement(m) - (0.5 if quantized(m) else 0.0),
        metric="agreement",
        plans=["int8"],
    )
    # A plan that cost 50 points is refused, and the card says float32 is served.
    assert strict["chosen"] is None
    assert strict["plans"][0]["drop_points"] == pytest.approx(50.0)
    assert "serving runs float32" in quantize.card_section(strict)
    assert "**int8**" in quantize.card_section(lenient)


def test_auto_applies_what_the_build_recorded(sentiment_model_dir: Path, tmp_path: Path) -> None:
    decision = {"quantization": {"chosen": "int8-no-ffn-out"}}
    recorded = _copy_with_record(sentiment_model_dir, tmp_path / "a", {"metrics": decision})
    assert quantize.resolve("auto", recorded) == "int8-no-ffn-out"
    assert quantize.resolve("off", recorded) is None
    assert quantize.resolve("int8", recorded) == "int8"
    none_chosen = {"metrics": {"quantization": {"chosen": None}}}
    for name, record in [
        ("none-chosen", none_chosen),
        ("no-record", None),
        ("corrupt", "{not json"),
        ("unknown-plan", {"metrics": {"quantization": {"chosen": "int2"}}}),
    ]:
        path = _copy_with_record(sentiment_model_dir, tmp_path / name, record)
        assert quantize.resolve("auto", path) is None, name


def test_the_built_models_record_a_decision_within_half_a_point(
    sentiment_model_dir: Path,
) -> None:
    for model_dir in (sentiment_model_dir, sentiment_model_dir.parent / "classify"):
        info = json.loads((model_dir / BUILD_INFO).read_text())
        decision = info["metrics"]["quantization"]
        metric = decision["metric"]
        assert [p["plan"] for p in decision["plans"]] == list(quantize.PLANS)
        chosen = [p for p in decision["plans"] if p["plan"] == decision["chosen"]]
        if chosen:
            drop = decision["float32"][metric] - chosen[0][metric]
            assert drop * 100 <= quantize.TOLERANCE_POINTS + 1e-9
            # ...and it is the first plan in the list that qualifies.
            before = decision["plans"][: decision["plans"].index(chosen[0])]
            assert all(p["drop_points"] > quantize.TOLERANCE_POINTS for p in before)
        assert "## int8 inference" in (model_dir / "README.md").read_text()


def test_quantize_setting_is_checked() -> None:
    assert quantize.parse_choice(" Int8-Attention ") == "int8-attention"
    with pytest.raises(ValueError, match="auto, off, int8"):
        quantize.parse_choice("fp16")
    import torch

    with pytest.raises(ConfigError, match="matches no linear layer"):
        quantize.apply(torch.nn.Sequential(torch.nn.ReLU()), "int8")


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

    from .conftest import REPO

    os.environ.pop("THREADS", None)
    os.environ["MODEL_DIR"] = str(sentiment_model_dir)
    # One thread per request the model could hold: 256 queued texts + 2 workers x 32 running.
    os.environ.update(MAX_QUEUED_TEXTS="256", MODEL_WORKERS="2", INFERENCE_BATCH_SIZE="32")
    functions_framework.create_app(
        target="sentiment", source=str(REPO / "functions" / "sentiment" / "main.py")
    )
    # functions-framework reads THREADS after importing the function, when it builds gunicorn.
    assert os.environ["THREADS"] == "320"
