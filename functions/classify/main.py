"""Text classification into the caller's labels (zero-shot) or a fine-tuned model's labels.

Entry point ``classify`` (functions-framework HTTP target). Endpoints: ``POST /v1/classify``,
``GET /v1/health``, ``GET /openapi.json``. The mode follows the model in ``MODEL_DIR``: a sentence
encoder (the default, packaged MiniLM) scores any labels the request names; a classifier trained
with ``make train`` answers with its own labels. Entry point ``classify_batch`` (CloudEvent
target): a Cloud Storage file of texts in, a predictions file out (:mod:`aifn.files`).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flask
import functions_framework
from classify_settings import ClassifySettings, check_template
from cloudevents.http import CloudEvent
from zero_shot import ZeroShotClassifier, prompts

import aifn
from aifn import InvalidRequest, Prediction, ref
from aifn.core.validation import (
    TEXT_PATTERN,
    check_string,
    fold,
    json_type,
    parse_texts,
    quote,
    require_object,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_LABEL_CHARS = 100
MAX_DESCRIPTION_CHARS = 1000
OPTION_FIELDS = frozenset({"labels", "descriptions", "multi_label", "template"})
FIELDS = {"text", "texts", *OPTION_FIELDS}

options = aifn.read_settings("classify", ClassifySettings)
service = aifn.start(
    "classify",
    default_model_dir=REPO_ROOT / "models" / "classify",
    description=(
        "Sort texts into categories. Zero-shot (a sentence-encoder model): name your `labels`, "
        "optionally with a description each, and every label is scored per text. Fine-tuned "
        "(a model trained with `make train`): the model's own labels are scored, and `labels` "
        "may narrow them."
    ),
    kinds=(aifn.ENCODER, aifn.CLASSIFIER),
)
predictor = service.predictor
zero_shot = (
    ZeroShotClassifier(
        predictor.embed,
        cache_size=options.label_cache_size,
        # A request's own new labels always fit in its caller's share.
        cache_share=max(options.label_cache_share, options.max_labels),
    )
    if isinstance(predictor.model, aifn.TextEncoder)
    else None
)
ZERO_SHOT = zero_shot is not None


def _request_schema() -> dict[str, Any]:
    label: dict[str, Any] = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_LABEL_CHARS,
        "pattern": TEXT_PATTERN,
    }
    if not ZERO_SHOT:
        label["enum"] = predictor.labels
    return {
        "type": "object",
        "description": "Exactly one of `text` or `texts`"
        + (", and the `labels` to score." if ZERO_SHOT else "; `labels` is optional."),
        "required": ["labels"] if ZERO_SHOT else [],
        "additionalProperties": False,
        "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
        "properties": {
            "text": ref("Text"),
            "texts": ref("TextList"),
            "labels": {
                "type": "array",
                "items": label,
                "minItems": 2,
                "maxItems": options.max_labels,
                "uniqueItems": True,
                "description": "The labels to score: unique, ignoring case, Unicode (NFKC) "
                "normalisation, invisible format characters and surrounding spaces."
                + ("" if ZERO_SHOT else " Must be labels of the model; narrows its labels."),
            },
            "descriptions": {
                "type": "object",
                "additionalProperties": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_DESCRIPTION_CHARS,
                    "pattern": TEXT_PATTERN,
                },
                "description": "Zero-shot only: a phrase per label describing it, embedded "
                "instead of the label's template. Keys must be in `labels`.",
            },
            "multi_label": {
                "type": "boolean",
                "default": False,
                "description": "Zero-shot only: score labels independently (a text may match "
                "several or none; see `matches`) instead of as one distribution.",
            },
            "template": {
                "type": "string",
                # `{label}` once, no NUL; [^\x00] rather than `.`, which stops at line ends.
                "pattern": r"^(?![^\x00]*\{label\}[^\x00]*\{label\})[^\x00]*\{label\}[^\x00]*$",
                "maxLength": 200,
                "description": "Zero-shot only: phrasing for labels without a description, "
                f"with `{{label}}` once (default `{options.zero_shot_template}`).",
            },
        },
    }


RESPONSE_SCHEMA = {
    "allOf": [
        ref("PredictionResponse"),
        {
            "type": "object",
            "required": ["mode", "multi_label"],
            "properties": {
                "mode": {"type": "string", "enum": ["zero-shot", "fine-tuned"]},
                "multi_label": {"type": "boolean"},
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "matches": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "Multi-label only: labels scoring at least "
                                "MULTI_LABEL_THRESHOLD, highest first.",
                            }
                        },
                    },
                },
            },
        },
    ]
}


def parse_labels(body: Mapping[str, Any], *, required: bool) -> list[str] | None:
    if "labels" not in body:
        if required:
            raise InvalidRequest("'labels' is missing: send the list of labels to score")
        return None
    labels = body["labels"]
    if not isinstance(labels, list):
        raise InvalidRequest(f"'labels' must be a list of strings, not {json_type(labels)}")
    if len(labels) < 2:
        raise InvalidRequest(f"'labels' has {len(labels)}; send at least 2")
    if len(labels) > options.max_labels:
        raise InvalidRequest(
            f"{len(labels)} labels in one request; the limit is {options.max_labels} (MAX_LABELS)"
        )
    seen: dict[str, int] = {}
    for i, value in enumerate(labels):
        key = _label_key(check_string(value, f"labels[{i}]", max_chars=MAX_LABEL_CHARS))
        if key in seen:
            raise InvalidRequest(
                f"'labels[{i}]' ({value!r}) repeats 'labels[{seen[key]}]'; labels must be unique "
                "(ignoring case, Unicode normalisation and surrounding spaces)"
            )
        seen[key] = i
    return list(labels)


def _label_key(label: str) -> str:
    """Labels that differ only in case, Unicode normalisation, invisible format characters or
    surrounding spaces are the same label (:func:`aifn.core.validation.fold`)."""
    return fold(label)


def parse_descriptions(body: Mapping[str, Any], labels: list[str]) -> dict[str, str]:
    """Descriptions keyed by the label as given in ``labels`` (keys match it like labels do)."""
    raw = body.get("descriptions", {})
    if not isinstance(raw, dict):
        raise InvalidRequest(
            f"'descriptions' must be an object of label to text, not {json_type(raw)}"
        )
    by_key = {_label_key(label): label for label in labels}
    descriptions: dict[str, str] = {}
    for key, value in raw.items():
        label = by_key.get(_label_key(key))
        if label is None:
            raise InvalidRequest(
                f"'descriptions' has {quote(key)}, which is not in 'labels'; describe only those"
            )
        if label in descriptions:
            raise InvalidRequest(f"'descriptions' describes {label!r} twice")
        descriptions[label] = check_string(
            value, f"descriptions[{quote(key)}]", max_chars=MAX_DESCRIPTION_CHARS
        ).strip()
    return descriptions


def parse_template(body: Mapping[str, Any]) -> str:
    if "template" not in body:
        return options.zero_shot_template
    try:
        return check_template(check_string(body["template"], "template", max_chars=200))
    except ValueError as exc:
        raise InvalidRequest(f"'template' {exc}") from None


def parse_multi_label(body: Mapping[str, Any]) -> bool:
    value = body.get("multi_label", False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'multi_label' must be true or false, not {json_type(value)}")
    return value


@dataclass(frozen=True)
class Options:
    """A request's fields besides its texts, validated (hashable: batch files group by it)."""

    labels: tuple[str, ...] | None
    descriptions: tuple[tuple[str, str], ...] = ()
    template: str = ""
    multi_label: bool = False


def parse_options(request: Mapping[str, Any]) -> Options:
    labels = parse_labels(request, required=zero_shot is not None)
    multi_label = parse_multi_label(request)
    if zero_shot is not None:
        assert labels is not None
        return Options(
            tuple(labels),
            tuple(parse_descriptions(request, labels).items()),
            parse_template(request),
            multi_label,
        )
    for field in ("descriptions", "template", "multi_label"):
        if field in request and request[field] is not False:
            raise InvalidRequest(
                f"'{field}' applies to zero-shot models only; this deployment serves a "
                f"fine-tuned classifier with the labels {predictor.labels}"
            )
    return Options(tuple(labels) if labels is not None else None)


def new_label_prompts(parsed: Options) -> list[str]:
    """The label prompts of a request the model would have to embed (zero-shot only)."""
    if zero_shot is None or parsed.labels is None:
        return []
    return zero_shot.new_prompts(
        prompts(list(parsed.labels), dict(parsed.descriptions), parsed.template)
    )


@dataclass(frozen=True)
class ClassifyRequest:
    """A validated ``POST /v1/classify`` body."""

    texts: list[str]
    options: Options
    # Its label prompts not in the label cache (zero-shot): the model embeds them too.
    new_prompts: list[str]


def parse_request(body: Any) -> ClassifyRequest:
    request = require_object(body, allowed=FIELDS)
    texts = parse_texts(request, max_texts=service.settings.max_batch_texts).texts
    options = parse_options(request)
    return ClassifyRequest(texts, options, new_label_prompts(options))


def work_units(request: ClassifyRequest) -> int:
    """A request's units of work: its texts, plus its label prompts not in the label cache.

    Each is one forward pass of the model; what the rate limit charges (Service.work_units).
    """
    return len(request.texts) + len(request.new_prompts)


@service.post(
    "/v1/classify",
    summary="Classify one text or a batch of texts.",
    parse=parse_request,
    work=work_units,
    request_schema=_request_schema(),
    response_schema=RESPONSE_SCHEMA,
    request_example={
        "text": "I was charged twice for my subscription this month.",
        "labels": ["billing", "bug report", "feature request"],
        "descriptions": {
            "billing": "A question about money: a charge, payment, card, invoice, refund or price."
        },
    }
    if ZERO_SHOT
    else {"texts": ["I was charged twice for my subscription this month."]},
)
def classify_texts(request: ClassifyRequest) -> dict[str, Any]:
    # MAX_REQUEST_TOKENS, before any model work: the texts and the label prompts to embed.
    predictor.check(request.texts, request.new_prompts)
    return {
        "model": predictor.model.identity.to_json(),
        "mode": "zero-shot" if zero_shot is not None else "fine-tuned",
        "multi_label": request.options.multi_label,
        "results": [p.to_json() for p in predict(request.texts, request.options)],
    }


def predict(texts: list[str], parsed: Options) -> list[Prediction]:
    """The predictor with this request's head: the same path for HTTP and batch files."""
    return predictor.predict(texts, head(parsed))


def head(parsed: Options) -> aifn.Head:
    """Zero-shot: the request's labels, with new label embeddings cached as the caller's (its
    cache scope; batch files have one of their own). Fine-tuned: the model's probabilities,
    renormalised over ``labels`` when given (over all its labels otherwise)."""
    if zero_shot is not None:
        assert parsed.labels is not None
        return zero_shot.head(
            list(parsed.labels),
            descriptions=dict(parsed.descriptions),
            template=parsed.template,
            multi_label=parsed.multi_label,
            threshold=options.multi_label_threshold,
            owner=aifn.current_scope(),
        )
    labels = list(parsed.labels) if parsed.labels is not None else predictor.labels
    unknown = [label for label in labels if label not in predictor.labels]
    if unknown:
        raise InvalidRequest(
            f"this model does not know the labels {unknown}; its labels are {predictor.labels}"
        )
    return predictor.classifier_head(labels)


files = aifn.Processor.start(
    "classify",
    predictor,
    predict=predict,
    option_fields=OPTION_FIELDS,
    parse_options=parse_options,
    http=service,
)


@functions_framework.http
def classify(request: flask.Request) -> flask.Response:
    return service(request)


@functions_framework.cloud_event
def classify_batch(event: CloudEvent) -> None:
    """A file finalized under ``BATCH_INPUT_PREFIX`` -> its predictions and errors files."""
    files.handle_event(event)
