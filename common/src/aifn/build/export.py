"""Build time: export a Hugging Face model directory to ONNX, and choose its int8 plan.

Serving runs ONNX graphs on ONNX Runtime (:mod:`aifn.core.model`); this module, which imports torch,
transformers and onnx, makes them, and only the build (the model-source step, ``make train``)
runs it. Two steps:

* :func:`export` writes ``onnx/model.onnx`` (float32) from the directory's safetensors weights.
  The graph ends in what serving returns: a classifier's probabilities (softmax in the graph),
  an encoder's unit-length mean-pooled embedding. A frozen mean-pooling layer
  (:func:`aifn.build.finetune.append_mean_pooling_layer`: a standard BERT layer built from constants
  so the directory loads anywhere) is exported as the masked mean and two layer norms it
  computes, not as a seventh encoder layer: a seventh of the work saved. The graph's outputs are
  checked against transformers' own model, each probe text alone, before anything is kept; a
  model that cannot be exported fails here, with a message, never at serve time.
* :func:`choose` measures the float32 graph and each int8 plan (:data:`PLANS`, dynamic
  quantization by ``onnxruntime.quantization``, weights per output channel) on the held-out data
  the caller's ``evaluate`` reads, through the serving code path, and keeps the first plan,
  fastest first, within :data:`TOLERANCE_POINTS` of float32. The figures go into the model card
  and ``aifn-model.json``; the plans not chosen are deleted.

Plans, fastest first (each keeps the rest of the graph in float32):

* ``int8``: every matrix product with a weight (attention, feed-forward).
* ``int8-no-first-ffn-out``: the same but the first layer's feed-forward output projection, whose
  input carries the largest activation outliers in MiniLM (measured: on the sentiment model it
  alone costs 0.65 of the full plan's 1 point), which a per-tensor input scale handles worst.
* ``int8-no-ffn-out``: every feed-forward output projection kept in float32.
* ``int8-attention``: the attention projections only.

Every plan also stores the word embeddings in int8 (a quarter of the bytes to load, to keep in
memory and to pull with the image). Products of two activations (attention scores) are never
quantized.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from aifn.core.errors import ConfigError
from aifn.core.model import (
    CLASSIFIER,
    ENCODER,
    FLOAT32_GRAPH,
    TextClassifier,
    TextEncoder,
    model_kind,
    one_line,
    plan_graph,
    read_config,
)

log = logging.getLogger(__name__)

OPSET = 17
PLANS = ("int8", "int8-no-first-ffn-out", "int8-no-ffn-out", "int8-attention")
# Largest accuracy drop (in points, i.e. 0.5 = half a percentage point) a plan may cost.
TOLERANCE_POINTS = 0.5
# Largest difference allowed between the exported graph's outputs and transformers' own.
PARITY_TOLERANCE = 1e-4
# Texts the export is checked on: short and long, plain and odd.
PROBES = (
    "I love this product!",
    "The delivery was late again and nobody answered my emails.",
    "Still waiting for a refund after three weeks.",
    "ok",
    "Prices rose 3.2% in October; the central bank is expected to act. " * 12,
    "¡Qué día! 😀 Ünïcödé, tabs\tand\nnew lines.",
)
Model = TextClassifier | TextEncoder
M = TypeVar("M", TextClassifier, TextEncoder)


class ExportError(ConfigError):
    """The model cannot be exported, or its graph does not compute what the model does."""


def fingerprint() -> dict[str, Any]:
    """What an exported, measured model depends on besides its weights: this code and serving's.

    Library versions (torch, transformers, onnx, onnxruntime) are in every cache key already
    (:func:`aifn.build.model_cache.environment`).
    """
    from aifn.core import model

    return {
        "export_sha256": _sha256(Path(__file__)),
        "model_sha256": _sha256(Path(model.__file__)),
        "opset": OPSET,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_source_dir(path: Path) -> dict[str, Any]:
    """Check that ``path`` is a Hugging Face directory this module can export; its config.

    Raises:
        ConfigError: With a message saying what is missing or wrong.
    """
    config = read_config(path)
    if not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"{path} has no model.safetensors; only safetensors weights are loaded "
            "(pickled .bin weights can run code)"
        )
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ConfigError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)")
    return config


def check_weights(path: Path, info: dict[str, Any], unused: tuple[str, ...] = ()) -> None:
    """Refuse weights that leave part of the model random: tensors missing or of other shapes.

    transformers fills such tensors with random values and carries on (a classifier without its
    head would answer, wrongly); ``info`` is its ``output_loading_info``. Missing tensors whose
    dotted name has a part in ``unused`` are allowed (an encoder never uses BERT's pooler).

    Raises:
        ConfigError: Naming the weights file and the first tensors concerned.
    """
    weights = path / "model.safetensors"
    missing = sorted(
        str(k) for k in info.get("missing_keys") or () if not set(str(k).split(".")) & set(unused)
    )
    if missing:
        raise ConfigError(
            f"{weights} lacks {len(missing)} tensor(s) the model needs ({_first(missing)}); "
            "they would be random"
        )
    mismatched = sorted(str(k[0]) for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise ConfigError(
            f"{weights} does not match {path / 'config.json'}: {len(mismatched)} tensor(s) "
            f"have other shapes ({_first(mismatched)})"
        )


def _first(names: list[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _load_torch(path: Path, kind: str) -> tuple[Any, Any]:
    """transformers' model (float32, eval mode) and fast tokenizer for the directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"could not load the tokenizer in {path}: {one_line(exc)}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{path}: serving needs a fast tokenizer (tokenizer.json); none loads")
    auto = AutoModelForSequenceClassification if kind == CLASSIFIER else AutoModel
    try:
        # Eager attention: plain matrix products that every ONNX Runtime version runs and
        # fuses. Mis-shaped tensors are reported by check_weights, by name.
        model, info = auto.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            attn_implementation="eager",
        )
    except Exception as exc:
        weights = path / "model.safetensors"
        raise ConfigError(f"could not load the weights {weights}: {one_line(exc)}") from exc
    check_weights(path, info, unused=("pooler",) if kind == ENCODER else ())
    return model.float().eval(), tokenizer


def _mean_pooling_layer(model: Any) -> tuple[Any, float] | None:
    """The trailing frozen mean-pooling layer of a BERT-style classifier and its scale, if any.

    Recognised only when every weight is exactly what :func:`aifn.build.finetune.
    append_mean_pooling_layer` writes: zero queries and keys (uniform attention), values
    ``c * I``, an identity attention output and an all-zero feed-forward output.
    """
    import torch

    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    try:
        with torch.no_grad():
            return _exact_pooling_layer(layer)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _exact_pooling_layer(layer: Any) -> tuple[Any, float] | None:
    import torch

    attn = layer.attention.self
    out = layer.attention.output.dense
    ffn_out = layer.output.dense
    scale = float(attn.value.weight[0, 0])
    eye = torch.eye(attn.value.weight.shape[0])
    zero = (attn.query.weight, attn.query.bias, attn.key.weight, attn.key.bias, attn.value.bias)
    exact = (
        not any(t.any() for t in (*zero, out.bias, ffn_out.weight, ffn_out.bias))
        and torch.equal(attn.value.weight, eye * scale)
        and torch.equal(out.weight, eye)
    )
    return (layer, scale) if exact else None


def _exportable(model: Any, kind: str) -> tuple[Any, bool]:
    """A module computing what serving returns, and whether a pooling layer became a shortcut."""
    import torch

    pooling = _mean_pooling_layer(model) if kind == CLASSIFIER else None
    if pooling is not None:
        model = copy.deepcopy(model)
        encoder = model.base_model.encoder
        encoder.layer = torch.nn.ModuleList(list(encoder.layer)[:-1])

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.pooling = pooling[0] if pooling else None
            self.scale = pooling[1] if pooling else 1.0

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            names = ("input_ids", "attention_mask", "token_type_ids")
            feeds = dict(zip(names, inputs, strict=False))
            if kind == ENCODER:
                states = self.model(**feeds).last_hidden_state
                return torch.nn.functional.normalize(_mean(states, feeds), dim=-1)
            if self.pooling is None:
                return torch.softmax(self.model(**feeds).logits, dim=-1)
            # The pooling layer, as computed: every token attends uniformly to the real tokens,
            # so its state is LayerNorm(scale * mean + own state), then LayerNorm again after an
            # all-zero feed-forward block. Only [CLS]'s reaches the pooler, so only it is made.
            base = self.model.base_model
            states = base(**feeds).last_hidden_state
            first = self.pooling.attention.output.LayerNorm(
                self.scale * _mean(states, feeds) + states[:, 0]
            )
            cls = self.pooling.output.LayerNorm(first)
            pooled = base.pooler(cls.unsqueeze(1))
            return torch.softmax(self.model.classifier(pooled), dim=-1)

    return Graph().eval(), pooling is not None


def _mean(states: Any, feeds: dict[str, Any]) -> Any:
    """Mean of the token states over the real (unmasked) tokens."""
    mask = feeds["attention_mask"].unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _reference(model: Any, kind: str, feeds: dict[str, Any]) -> Any:
    """transformers' own answer (the unmodified model) for the parity check."""
    import torch

    if kind == CLASSIFIER:
        return torch.softmax(model(**feeds).logits, dim=-1)
    states = model(**feeds).last_hidden_state
    return torch.nn.functional.normalize(_mean(states, feeds), dim=-1)


def export(path: Path) -> dict[str, Any]:
    """Write ``path/onnx/model.onnx`` (float32) from the model in ``path``; check it.

    Writes ``tokenizer.json`` too when the directory has only a ``vocab.txt``. Returns what to
    record: the opset, the inputs, whether a pooling layer was exported as its shortcut, the
    largest difference from transformers' outputs over the probe texts, and the graph's size.

    Raises:
        ExportError: The model cannot be exported or its graph computes something else.
        ConfigError: The directory is not a loadable model.
    """
    import torch

    config = check_source_dir(path)
    kind = model_kind(config)
    started = time.perf_counter()
    model, tokenizer = _load_torch(path, kind)
    if not (path / "tokenizer.json").is_file():
        tokenizer.backend_tokenizer.save(str(path / "tokenizer.json"))
    graph, shortcut = _exportable(model, kind)
    accepted = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    sample = tokenizer(list(PROBES[:3]), padding=True, truncation=True, return_tensors="pt")
    inputs = tuple(sample[name] for name in names)
    output = "probabilities" if kind == CLASSIFIER else "embeddings"
    target = path / FLOAT32_GRAPH
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's notes on Python-side shape checks and indexing: what the graph computes
            # is checked below against the model itself, text by text.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                inputs,
                str(partial),
                input_names=names,
                output_names=[output],
                dynamic_axes={
                    **{name: {0: "texts", 1: "tokens"} for name in names},
                    output: {0: "texts"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(partial, target)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise ExportError(f"{path}: the model cannot be exported to ONNX: {one_line(exc)}") from exc

    # The graph as serving runs it (its tokenizer, each text alone) against transformers.
    cls = TextClassifier if kind == CLASSIFIER else TextEncoder
    limit = int(config.get("max_position_embeddings") or 512)
    served = cls.load(path, max_tokens=limit, threads=1, graph=FLOAT32_GRAPH)
    worst = 0.0
    with torch.no_grad():
        for text in PROBES:
            feeds = tokenizer(
                [text], truncation=True, max_length=served.max_tokens, return_tensors="pt"
            )
            expected = _reference(model, kind, {n: feeds[n] for n in names}).numpy()[0]
            got = served.forward([text])[0][0]
            worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= PARITY_TOLERANCE:
        target.unlink()
        raise ExportError(
            f"{path}: the exported graph's outputs differ from the model's by up to {worst:.2e} "
            f"(more than {PARITY_TOLERANCE:g}); not kept"
        )
    record = {
        "opset": OPSET,
        "inputs": names,
        "output": output,
        "pooling_layer_as_mean": shortcut,
        "max_abs_difference": float(f"{worst:.3g}"),
        "graph_mb": _megabytes(target),
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    log.info("exported %s to ONNX: %s", path, record)
    return record


# A lookup table this large (elements) is the word embeddings, not a position or type table.
_LARGE_TABLE = 1 << 20


@dataclass(frozen=True)
class Quantizable:
    """A float32 graph's nodes the plans choose from, each list in graph order."""

    # MatMul nodes whose second input is a weight (an initializer).
    products: list[str]
    # Gather nodes that look up rows of a large weight table (the word embeddings).
    tables: list[str]


def quantizable(graph_path: Path) -> Quantizable:
    """What the plans may quantize in the graph at ``graph_path`` (read once)."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    return Quantizable(
        products=[
            node.name
            for node in graph.node
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in sizes
        ],
        tables=[
            node.name
            for node in graph.node
            if node.op_type == "Gather" and sizes.get(node.input[0], 0) >= _LARGE_TABLE
        ],
    )


def _megabytes(file: Path) -> float:
    return round(file.stat().st_size / 1e6, 1)


def _is_ffn_out(name: str) -> bool:
    return "/output/dense/" in name and "/attention/" not in name


def selected(plan: str, products: Sequence[str]) -> list[str]:
    """The weight products (in graph order) ``plan`` quantizes."""
    ffn_out = [name for name in products if _is_ffn_out(name)]
    if plan == "int8":
        return list(products)
    if plan == "int8-no-first-ffn-out":
        return [name for name in products if name not in ffn_out[:1]]
    if plan == "int8-no-ffn-out":
        return [name for name in products if name not in ffn_out]
    if plan == "int8-attention":
        return [name for name in products if "/attention/" in name]
    raise ValueError(f"unknown quantization plan {plan!r}")


def quantize(path: Path, plan: str, nodes: Quantizable) -> str | None:
    """Write ``plan``'s int8 graph beside the float32 one; its file, or None if it selects none.

    ``nodes`` is :func:`quantizable` of the float32 graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = path / FLOAT32_GRAPH
    chosen = selected(plan, nodes.products)
    if not chosen:
        return None
    # The word embeddings too: half of a MiniLM's weights, looked up (not multiplied), so int8
    # rows cost no time; measured on the sentiment model, no accuracy either.
    chosen += nodes.tables
    graph = plan_graph(plan)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for static quantization
    try:
        quantize_dynamic(
            source,
            path / graph,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_quantize=chosen,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    return graph


def texts_per_second(models: Sequence[Model], texts: Sequence[str], rounds: int = 3) -> list[float]:
    """Each model's texts/s over ``texts``, each text alone as served, best of ``rounds``.

    The models take turns in every round, so a noisy neighbour slows them alike; the best round
    is the figure least disturbed by other work.
    """
    best = [float("inf")] * len(models)
    for model in models:
        model.forward(list(texts[:4]))  # warm-up
    for _ in range(rounds):
        for i, model in enumerate(models):
            started = time.perf_counter()
            model.forward(list(texts))
            best[i] = min(best[i], time.perf_counter() - started)
    return [round(len(texts) / seconds, 1) for seconds in best]


def choose(
    path: Path,
    evaluate: Callable[[M], float],
    *,
    metric: str,
    load: Callable[[str], M],
    probe: Sequence[str],
    plans: Sequence[str] = PLANS,
    tolerance_points: float = TOLERANCE_POINTS,
) -> dict[str, Any]:
    """Measure float32 and each plan, keep the first plan within the tolerance; the decision.

    ``evaluate`` runs a served model over the held-out data and returns the figure named
    ``metric`` (0..1, higher is better); ``load`` loads the directory's model on a graph file;
    speed is each graph's texts/s on ``probe`` (one thread, each text alone, as served). Every
    plan is measured, so the card shows what each costs; the chosen one is the first (fastest)
    within ``tolerance_points``, or none (float32). Graphs of plans not chosen are deleted.
    """
    float32 = load(FLOAT32_GRAPH)
    full = evaluate(float32)
    nodes = quantizable(path / FLOAT32_GRAPH)
    results: list[dict[str, Any]] = []
    models: list[M] = [float32]
    chosen = None
    for plan in plans:
        graph = quantize(path, plan, nodes)
        if graph is None:
            log.info("plan %s matches no weight product in this graph; skipped", plan)
            continue
        model = load(graph)
        figure = evaluate(model)
        drop = round((full - figure) * 100, 3)
        results.append(
            {
                "plan": plan,
                metric: figure,
                "drop_points": drop,
                "graph_mb": _megabytes(path / graph),
            }
        )
        models.append(model)
        if chosen is None and drop <= tolerance_points:
            chosen = plan
    speeds = texts_per_second(models, probe)
    for result, speed in zip(results, speeds[1:], strict=True):
        result.update(texts_per_second=speed, speedup=round(speed / speeds[0], 2))
        if result["plan"] != chosen:
            (path / plan_graph(result["plan"])).unlink()
    return {
        "metric": metric,
        "tolerance_points": tolerance_points,
        "float32": {
            metric: full,
            "texts_per_second": speeds[0],
            "graph_mb": _megabytes(path / FLOAT32_GRAPH),
        },
        "plans": results,
        "probe_texts": len(probe),
        "chosen": chosen,
    }


def card_section(decision: dict[str, Any]) -> str:
    """Markdown for a model card: what each graph scored and how fast, and which one serves."""
    metric = decision["metric"]
    f32 = decision["float32"]
    rows = [
        f"| float32 | {f32[metric]:.4f} | - | {f32['texts_per_second']:.0f} | 1.00x "
        f"| {f32['graph_mb']:.0f} |",
        *(
            f"| {p['plan']} | {p[metric]:.4f} | {-p['drop_points']:+.2f} "
            f"| {p['texts_per_second']:.0f} | {p['speedup']:.2f}x | {p['graph_mb']:.0f} |"
            for p in decision["plans"]
        ),
    ]
    chosen = decision["chosen"]
    verdict = (
        f"Serving runs **{chosen}** (`QUANTIZE=auto`, the default; `QUANTIZE=off` serves float32)."
        if chosen
        else "No plan is within the tolerance, so serving runs float32 (`QUANTIZE=auto`)."
    )
    return (
        "## Inference graphs (ONNX Runtime)\n\n"
        f"The float32 graph and each dynamic int8 plan, measured through the serving code path on "
        f"the same held-out data ({metric}); speed is texts/s with one thread, each text alone as "
        f"served, over {decision['probe_texts']} held-out texts (best of three, on the build "
        f"machine). A plan is used when it costs at most {decision['tolerance_points']} point.\n\n"
        f"| graph | {metric} | change (points) | texts/s | speed | MB |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\n{verdict}\n"
    )


def no_plans_section() -> str:
    """Card text for a model exported without held-out data (float32 only)."""
    return (
        "## Inference graph (ONNX Runtime)\n\n"
        "Exported to ONNX in float32. No held-out data came with this source, so no int8 plan "
        "was measured and serving runs float32.\n"
    )
