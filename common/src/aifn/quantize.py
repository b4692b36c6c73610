"""int8 dynamic quantization: chosen when a model is built, applied when it is loaded.

Dynamic quantization stores a linear layer's weights as int8 (per output channel) and quantizes
its input on the fly, so the layer runs as an int8 matrix product: on these CPUs about 2-3x the
texts/s of float32 for a MiniLM-sized encoder. What it costs in accuracy depends on the model,
so it is never assumed: a model's build (its recipe, or ``make train``) measures the held-out
figure of each *plan* below against full precision, fastest plan first, and records the first
one within :data:`TOLERANCE_POINTS` in the model's build record (``aifn-model.json``). At load
time ``QUANTIZE=auto`` applies exactly that plan; a model with no such record (a local directory,
a Hub model) runs in full precision; ``QUANTIZE=off`` always does.

Plans, fastest first (each keeps the rest of the model in float32):

* ``int8``: every linear layer of the encoder, the pooler and the head.
* ``int8-no-ffn-out``: the same but the feed-forward output projections, the layers whose inputs
  carry the activation outliers that per-tensor input quantization handles worst.
* ``int8-attention``: the attention projections only.

A frozen mean-pooling layer (``aifn.training.append_mean_pooling_layer``: zero queries and keys)
is never quantized: its identity projections must stay exact.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aifn.errors import ConfigError

log = logging.getLogger(__name__)

# Largest accuracy drop (in points, i.e. 0.5 = half a percentage point) a plan may cost.
TOLERANCE_POINTS = 0.5
PLANS = ("int8", "int8-no-ffn-out", "int8-attention")
AUTO, OFF = "auto", "off"
CHOICES = (AUTO, OFF, *PLANS)


def parse_choice(raw: str) -> str:
    """Parse ``QUANTIZE``: ``auto``, ``off`` or a plan name."""
    value = raw.strip().lower()
    if value not in CHOICES:
        raise ValueError(f"must be one of {', '.join(CHOICES)}")
    return value


def _is_ffn_out(name: str) -> bool:
    return name.endswith("output.dense") and ".attention." not in name


def _selected(plan: str, name: str) -> bool:
    if plan == "int8":
        return True
    if plan == "int8-no-ffn-out":
        return not _is_ffn_out(name)
    if plan == "int8-attention":
        return ".attention." in name
    raise ValueError(f"unknown quantization plan {plan!r}")


def _uniform_attention_layers(model: Any) -> list[str]:
    """Names of modules that are mean-pooling layers (all-zero queries and keys)."""
    names = []
    for name, module in model.named_modules():
        attn = getattr(module, "attention", None)
        inner = getattr(attn, "self", None)
        query, key = getattr(inner, "query", None), getattr(inner, "key", None)
        if query is None or key is None:
            continue
        if not (query.weight.any() or key.weight.any()):
            names.append(name)
    return names


def linear_layers(model: Any, plan: str) -> list[str]:
    """The names of the linear layers ``plan`` quantizes in ``model``."""
    import torch

    frozen = _uniform_attention_layers(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name.startswith(prefix + ".") for prefix in frozen)
        and _selected(plan, name)
    ]


def apply(model: Any, plan: str) -> Any:
    """Quantize ``model`` in place with ``plan``; returns it."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = linear_layers(model, plan)
    if not names:
        raise ConfigError(f"quantization plan {plan!r} matches no linear layer in this model")
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization is deprecated in favour of torchao, an extra
        # dependency; it still ships in torch and is what this version pins.
        warnings.simplefilter("ignore")
        quantize_dynamic(  # type: ignore[no-untyped-call]
            model,
            {name: per_channel_dynamic_qconfig for name in names},
            dtype=torch.qint8,
            inplace=True,
        )
    return model


def choose(
    model: Any,
    evaluate: Callable[[Any], float],
    *,
    metric: str,
    plans: Sequence[str] = PLANS,
    tolerance_points: float = TOLERANCE_POINTS,
) -> dict[str, Any]:
    """Measure each plan on a copy of ``model`` and return the decision to record.

    ``evaluate`` runs the model (float or quantized) over the held-out data and returns the
    figure named ``metric`` (0..1, higher is better). Every plan is measured, so the card shows
    what each costs; the chosen one is the first (fastest) within the tolerance, or none. Each
    plan's speed-up is timed against float32 back to back on the same synthetic batch.
    """
    import copy

    full = {metric: evaluate(model)}
    results = []
    chosen = None
    for plan in plans:
        candidate = apply(copy.deepcopy(model), plan)
        figures: dict[str, Any] = {metric: evaluate(candidate)}
        drop = round((full[metric] - figures[metric]) * 100, 3)
        figures.update(plan=plan, drop_points=drop, speedup=speedup(model, candidate))
        results.append(figures)
        if chosen is None and drop <= tolerance_points:
            chosen = plan
    return {
        "metric": metric,
        "tolerance_points": tolerance_points,
        "float32": full,
        "plans": results,
        "chosen": chosen,
    }


def speedup(reference: Any, candidate: Any, *, batch: int = 32, tokens: int = 64) -> float:
    """How many times faster ``candidate`` runs a batch than ``reference``.

    Both run the same random batch of ``batch`` x ``tokens`` token ids, alternately, and each
    keeps its best of five: on a shared machine the minimum is the figure least disturbed by
    other work.
    """
    import torch

    vocab = int(getattr(reference.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, tokens), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    best = {"reference": float("inf"), "candidate": float("inf")}
    with torch.inference_mode():
        for module in (reference, candidate):
            module(**inputs)  # warm-up
        for _ in range(5):
            for name, module in (("reference", reference), ("candidate", candidate)):
                started = time.perf_counter()
                module(**inputs)
                best[name] = min(best[name], time.perf_counter() - started)
    return round(best["reference"] / best["candidate"], 2)


def recorded_plan(path: Path) -> str | None:
    """The plan the model's build chose (``aifn-model.json``), or None."""
    from aifn.model import BUILD_INFO

    try:
        info = json.loads((path / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metrics = info.get("metrics") if isinstance(info, dict) else None
    decision = metrics.get("quantization") if isinstance(metrics, dict) else None
    plan = decision.get("chosen") if isinstance(decision, dict) else None
    return plan if plan in PLANS else None


def resolve(setting: str, path: Path) -> str | None:
    """The plan to apply for ``QUANTIZE=setting`` to the model in ``path`` (None: float32)."""
    if setting == OFF:
        return None
    if setting == AUTO:
        return recorded_plan(path)
    return setting


def card_section(decision: dict[str, Any]) -> str:
    """Markdown for a model card: what each plan cost and which one serving uses."""
    metric = decision["metric"]
    rows = [
        f"| float32 | {decision['float32'][metric]:.4f} | - | 1.00x |",
        *(
            f"| {p['plan']} | {p[metric]:.4f} | {-p['drop_points']:+.2f} | {p['speedup']:.2f}x |"
            for p in decision["plans"]
        ),
    ]
    chosen = decision["chosen"]
    verdict = (
        f"Serving applies **{chosen}** (`QUANTIZE=auto`, the default; `QUANTIZE=off` serves "
        "float32)."
        if chosen
        else "No plan is within the tolerance, so serving runs float32 (`QUANTIZE=auto`)."
    )
    return (
        "## int8 inference\n\n"
        f"Each dynamic int8 plan measured on the same held-out data ({metric}); speed is a "
        f"batch of 32 x 64 tokens against float32, best of five each, on the build machine. A "
        f"plan is used when it costs at most {decision['tolerance_points']} point.\n\n"
        f"| plan | {metric} | change (points) | speed |\n|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n{verdict}\n"
    )
