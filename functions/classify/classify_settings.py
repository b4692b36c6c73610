"""The classify function's own settings, beside the shared ones in :mod:`aifn.settings`."""

from __future__ import annotations

from dataclasses import dataclass

from aifn.settings import int_at_least, positive_int, setting, unit_interval

DEFAULT_TEMPLATE = "This is about {label}."


def check_template(raw: str) -> str:
    """A label template: ``{label}`` exactly once (raises ``ValueError`` otherwise)."""
    if raw.count("{label}") != 1:
        raise ValueError("must contain '{label}' exactly once")
    return raw


@dataclass(frozen=True)
class ClassifySettings:
    """Settings only the classify function reads."""

    max_labels: int = setting(
        "MAX_LABELS",
        "Most labels in one classify request; more get 422 `invalid_request`. Each label costs "
        "one embedding (once, then cached) and one score per text.",
        50,
        parse=int_at_least(2),
    )
    label_cache_size: int = setting(
        "LABEL_CACHE_SIZE",
        "Zero-shot label embeddings kept in memory (least recently used evicted first); about "
        "1.5 KB each. A repeated label set costs no model call.",
        4096,
        parse=positive_int,
    )
    label_cache_share: int = setting(
        "LABEL_CACHE_CALLER_SHARE",
        "Label embeddings one caller alone may hold in the label cache (at least `MAX_LABELS`). "
        "A label only one caller has used is that caller's; past its share its own oldest label "
        "makes room, and a label a second caller uses becomes everyone's, which no single "
        "caller's new labels evict. So random labels from one caller displace at most this many "
        "of other callers' entries.",
        256,
        parse=positive_int,
    )
    zero_shot_template: str = setting(
        "ZERO_SHOT_TEMPLATE",
        "How a bare label is phrased before it is embedded; must contain `{label}`. A request's "
        "`template` overrides it; a label's description replaces it.",
        DEFAULT_TEMPLATE,
        parse=check_template,
        shown_default=f"`{DEFAULT_TEMPLATE}`",
    )
    multi_label_threshold: float = setting(
        "MULTI_LABEL_THRESHOLD",
        "With `multi_label: true`, a label is in a result's `matches` when its score is at least "
        "this (scores are independent per label, 0..1).",
        0.5,
        parse=unit_interval,
    )
