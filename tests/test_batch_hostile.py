"""Property tests: whatever bytes a batch file or an event holds, the batch path never raises.

Hypothesis writes files of hostile lines (JSON that spells lone surrogates, integers past
Python's digit limit, deep nesting, bad UTF-8, CR/LF mixes, over-long lines, request fields of
every type) and event payloads of every shape. For each file, every record comes out in exactly
one of the two outputs, both outputs are valid UTF-8 JSONL, and the run ends; for each event,
the answer is a parsed event or a reason. The model is a stand-in (a hash): what is tested is
the reading, validation and writing around it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifn.core.errors import InvalidRequest
from aifn.core.model import ModelIdentity, Prediction
from aifn.files import processor as batch
from aifn.files.processor import BatchSettings, Capability
from aifn.files.storage import Location
from aifn.settings import read_env


def _predict(texts: list[str], options: Any) -> list[Prediction]:
    labels = list(options) if options else ["A", "B"]
    out = []
    for text in texts:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        top = digest[0] / 255
        ranked = [(labels[0], top)] + [(lbl, (1 - top) / (len(labels) - 1)) for lbl in labels[1:]]
        out.append(Prediction(ranked, truncated=False, cached=False))
    return out


def _parse_labels(fields: Mapping[str, Any]) -> Hashable:
    labels = fields.get("labels")
    if labels is None:
        return None
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(x, str) and x.strip() for x in labels)
    ):
        raise InvalidRequest("'labels' must be a list of at least 2 non-empty strings")
    return tuple(labels)


CAPABILITY = Capability(
    name="hostile",
    model=ModelIdentity("stand-in", "sha256:0"),
    predict=_predict,
    option_fields=frozenset({"labels"}),
    parse_options=_parse_labels,
)

# Pieces of lines a hostile caller would write; hypothesis strings them together.
_PIECES = [
    '{"text": "fine"}',
    '{"id": "\\ud800", "text": "x"}',
    '{"id": 1' + "0" * 4400 + ', "text": "x"}',
    '{"text": "x", "labels": [' + "1" * 4400 + "]}",
    '{"text": "\\udfff"}',
    '{"text": "x", "labels": "' + "[" * 3000 + '"}',
    "[" * 5000,
    '{"text": "x", "labels": ["a", "\\ud800"]}',
    '{"text": "x", "labels": [["a"], {"b": 1}]}',
    '{"text": "x", "labels": ["a", "b"]}',
    '{"labels": ["h1", "h2"]}',
    '{"id": true, "text": "x"}',
    '{"id": -1, "text": "x"}',
    '{"id": 1e999, "text": "x"}',
    '{"text": NaN}',
    '{"text": "' + "w " * 300 + '"}',
    "\ufeff",
    "\x00",
    '"',
    ",",
    "\r",
    "\n",
    "\r\n",
    "text,id,labels",
    'x,1,"[""a"", ""b""]"',
    'x,2,"' + "[" * 3000 + '"',
    "x,3," + "9" * 4400,
]
_LINES = st.lists(
    st.one_of(st.sampled_from(_PIECES), st.text(max_size=40), st.binary(max_size=40)),
    max_size=30,
)


def _bytes(parts: list[str | bytes]) -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else p.encode("utf-8", "surrogatepass") for p in parts
    )


def _run(tmp: Path, name: str, content: bytes, env: dict[str, str]) -> None:
    source = tmp / name
    source.write_bytes(content)
    processor = batch.Processor(CAPABILITY, read_env(BatchSettings, env))
    pred = Location(None, str(tmp / "out" / f"{name}.predictions.jsonl"))
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    summary = processor.run_local(Location(None, str(source)), outputs)
    rows = []
    for path in (Path(pred.path), Path(outputs.errors.path)):
        for line in path.read_bytes().decode("utf-8").splitlines():  # valid UTF-8
            rows.append(json.loads(line))  # valid JSON, one object per line
    assert summary.predictions + summary.errors == len(rows)
    numbered = [r["line"] for r in rows if r["line"] is not None]
    assert len(numbered) == len(set(numbered)), "a record came out twice"
    if all(r["line"] is not None for r in rows):
        assert summary.records == len(rows), "a record was neither predicted nor reported"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    parts=_LINES,
    fmt=st.sampled_from(["in.jsonl", "in.csv"]),
    limit=st.sampled_from(["64", "1048576"]),
)
def test_any_file_is_predicted_or_reported_never_raised(
    tmp_path: Path, parts: list[str | bytes], fmt: str, limit: str
) -> None:
    content = _bytes(parts)
    if fmt == "in.csv" and not content.startswith(b"text"):
        content = b"text,id,labels\n" + content
    _run(tmp_path, fmt, content, {"BATCH_MAX_LINE_BYTES": limit, "BATCH_CHUNK_SIZE": "4"})


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.just("9" * 5000),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_FIELD = st.one_of(_JSON, st.text(alphabet=st.characters(), max_size=30))


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=60),
        st.text(max_size=60),
        _JSON,
        st.fixed_dictionaries(
            {},
            optional={
                "bucket": _FIELD,
                "name": _FIELD,
                "generation": _FIELD,
                "size": _FIELD,
            },
        ),
    )
)
def test_any_event_payload_parses_to_an_event_or_a_reason(data: Any) -> None:
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": batch.FINALIZED, "source": "//storage", "id": "e"}, data)
    parsed = batch.parse_event(event)
    assert isinstance(parsed, (str, batch.ObjectEvent))
    if isinstance(parsed, batch.ObjectEvent):
        parsed.name.encode("utf-8")  # a usable object name
        assert parsed.generation is None or parsed.generation > 0
        assert parsed.size is None or parsed.size >= 0
