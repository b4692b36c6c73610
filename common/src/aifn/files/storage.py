"""Files for batch inference: where they are (local or ``gs://``) and what is in them.

Inputs are read as streams, never whole: a Cloud Storage object through
:meth:`google.cloud.storage.Blob.open` (ranged reads, pinned to one generation), a local file
as is. Records come out one by one with their line numbers, read by :class:`BoundedLines`,
which never holds more than the line limit plus one block, whatever the file holds. Outputs are
written to a local temporary file first and then published in one step — :func:`os.replace`
locally, one upload with a generation precondition on Cloud Storage — so a reader sees a whole
file or none.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
READ_CHUNK_BYTES = 1024 * 1024


class UnreadableFile(Exception):
    """The file as a whole cannot be read (no CSV header, no text column); the message says why."""


def file_format(name: str) -> str | None:
    """``"jsonl"``, ``"csv"``, or ``None`` for a name this module does not read."""
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(CSV_SUFFIXES):
        return "csv"
    return None


# --- where files are -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A local path (``bucket`` is ``None``) or a Cloud Storage object or prefix."""

    bucket: str | None
    path: str

    @classmethod
    def parse(cls, value: str) -> Location:
        """``gs://bucket/name`` or a local path.

        Raises:
            ValueError: A ``gs://`` URL without a bucket.
        """
        if value.startswith("gs://"):
            bucket, _, name = value.removeprefix("gs://").partition("/")
            if not bucket:
                raise ValueError(f"{value}: expected gs://BUCKET/NAME")
            return cls(bucket, name)
        return cls(None, str(Path(value).expanduser()))

    @property
    def is_gcs(self) -> bool:
        return self.bucket is not None

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.path}" if self.is_gcs else self.path

    def sibling(self, path: str) -> Location:
        """Another location in the same bucket (or on the local disk)."""
        return Location(self.bucket, path)


@dataclass(frozen=True)
class ObjectInfo:
    """What is known about an existing output: its generation and custom metadata."""

    generation: int
    metadata: dict[str, str]
    size: int = 0


_clients: dict[str | None, Any] = {}


def storage_client() -> Any:
    """A google-cloud-storage client, one per process (per ``STORAGE_EMULATOR_HOST``, in tests)."""
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    if key not in _clients:
        from google.cloud import storage

        _clients[key] = storage.Client()
    return _clients[key]


def _blob(location: Location, generation: int | None = None) -> Any:
    return storage_client().bucket(location.bucket).blob(location.path, generation=generation)


def stat(location: Location) -> ObjectInfo | None:
    """The object's generation and metadata, or ``None`` when it does not exist."""
    if not location.is_gcs:
        path = Path(location.path)
        return ObjectInfo(0, {}, path.stat().st_size) if path.is_file() else None
    blob = storage_client().bucket(location.bucket).get_blob(location.path)
    if blob is None:
        return None
    return ObjectInfo(int(blob.generation), dict(blob.metadata or {}), int(blob.size or 0))


def list_objects(prefix: Location) -> Iterator[tuple[str, int]]:
    """(name, generation) of every object under a ``gs://`` prefix, in name order."""
    for blob in storage_client().list_blobs(prefix.bucket, prefix=prefix.path):
        yield blob.name, int(blob.generation)


def delete(location: Location) -> None:
    """Remove the file or object if it exists."""
    if location.is_gcs:
        from google.api_core.exceptions import NotFound

        with suppress(NotFound):
            _blob(location).delete()
    else:
        Path(location.path).unlink(missing_ok=True)


class _Counting(io.RawIOBase):
    """A read-only stream that reports how many bytes have passed through it.

    ``gone`` is the exception type that means the object no longer exists (Cloud Storage's
    ``NotFound``, which a pinned generation raises on its first read, not at open): it becomes
    :class:`FileNotFoundError`, whenever it happens.
    """

    def __init__(
        self,
        raw: BinaryIO,
        on_bytes: Callable[[int], None] | None,
        gone: type[BaseException] | tuple[type[BaseException], ...] = (),
        name: str = "",
    ) -> None:
        self._raw = raw
        self._on_bytes = on_bytes
        self._gone = gone
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._raw.read(len(buffer))
        except self._gone:
            raise FileNotFoundError(self._name) from None
        n = len(data)
        buffer[:n] = data
        if n and self._on_bytes is not None:
            self._on_bytes(n)
        return n


@contextmanager
def open_input(
    location: Location,
    *,
    generation: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[BinaryIO]:
    """A binary stream of the file, read in chunks; ``generation`` pins a Cloud Storage read.

    Raises:
        FileNotFoundError: The file or object (at that generation) does not exist.
    """
    gone: tuple[type[BaseException], ...] = ()
    if location.is_gcs:
        from google.api_core.exceptions import NotFound

        gone = (NotFound,)
        try:
            raw = _blob(location, generation).open("rb", chunk_size=READ_CHUNK_BYTES)
        except NotFound:
            raise FileNotFoundError(str(location)) from None
    else:
        raw = open(location.path, "rb")  # noqa: SIM115 - closed below
    try:
        yield io.BufferedReader(_Counting(raw, on_bytes, gone, str(location)), READ_CHUNK_BYTES)
    finally:
        raw.close()


class PreconditionFailed(Exception):
    """Somebody else wrote the object since we looked (Cloud Storage answered 412)."""


def publish(
    source: Path,
    target: Location,
    *,
    if_generation_match: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Make ``source`` (a complete local file) appear at ``target`` in one step.

    On Cloud Storage this is one upload with the precondition ``if_generation_match`` (``0``:
    only if the object does not exist); the object becomes visible only once the upload is
    complete. Locally, the file is renamed over the target (same directory, so atomic).

    Raises:
        PreconditionFailed: Cloud Storage refused the write because of the precondition.
    """
    if target.is_gcs:
        from google.api_core.exceptions import PreconditionFailed as Http412

        blob = _blob(target)
        blob.metadata = metadata or None
        try:
            blob.upload_from_filename(
                str(source),
                content_type="application/x-ndjson",
                if_generation_match=if_generation_match,
            )
        except Http412:
            raise PreconditionFailed(str(target)) from None
        return
    path = Path(target.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if source.parent.resolve() == path.parent.resolve():
        os.replace(source, path)
    else:  # a temporary file elsewhere: copy beside the target first, then rename
        staged = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(source, "rb") as src, open(staged, "wb") as dst:
            while block := src.read(READ_CHUNK_BYTES):
                dst.write(block)
        os.replace(staged, path)


# --- what is in them -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """One record before validation: its first line number and its fields, or why it is bad."""

    line: int
    fields: dict[str, Any] | None
    error: str | None = None


class LineTooLong(Exception):
    """A line (or a CSV record) over the reader's limit; it was skipped, never held whole."""


_LINE_END = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"


class BoundedLines:
    r"""The lines of a binary stream, decoded, none of them ever held past ``limit`` bytes.

    Lines end at ``\n``, ``\r\n`` or a lone ``\r`` (universal newlines, as
    :class:`io.TextIOWrapper` reads them with ``newline=""``) and come out with their line break;
    a UTF-8 byte-order mark at the start is dropped, and undecodable bytes stay lone surrogates
    (``surrogateescape``), so one bad line is reported as that line's error instead of stopping
    the whole file. A line longer than ``limit`` bytes (its line break not counted) raises
    :class:`LineTooLong` once the reader has skipped through its line break, reading on in blocks
    without keeping them: memory stays under ``limit`` plus one block, whatever the file holds (a
    1 GB line, or a file with no line break at all).

    ``line`` counts the physical lines consumed so far. For CSV, where a quoted record may span
    lines, ``record_limit`` also bounds the bytes since the last :meth:`start_record`.
    """

    def __init__(self, stream: BinaryIO, limit: int, *, block: int = 64 * 1024) -> None:
        self._stream = stream
        self._limit = limit
        self._block = block
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._record = 0
        self.line = 0

    def __iter__(self) -> BoundedLines:
        return self

    def start_record(self) -> None:
        """A CSV record starts at the next line: its byte count starts again."""
        self._record = 0

    def __next__(self) -> str:
        raw = self._next_bytes()
        if raw is None:
            raise StopIteration
        if self.line == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        self._record += len(raw) - (2 if raw.endswith(b"\r\n") else raw.endswith((b"\n", b"\r")))
        if self._record > self._limit:
            raise LineTooLong(f"longer than {self._limit} bytes")
        return raw.decode("utf-8", "surrogateescape")

    def _next_bytes(self) -> bytes | None:
        scan = self._pos
        while True:
            found = _LINE_END.search(self._buf, scan)
            if found is not None and self._complete(found):
                start, self._pos = self._pos, found.end()
                self.line += 1
                if found.start() - start > self._limit:
                    raise LineTooLong(f"longer than {self._limit} bytes")
                return bytes(self._buf[start : found.end()])
            scan = found.start() if found is not None else len(self._buf)
            if scan - self._pos > self._limit:
                self._skip_line()
                self.line += 1
                raise LineTooLong(f"longer than {self._limit} bytes")
            if self._eof:
                if self._pos == len(self._buf):
                    return None
                start, self._pos = self._pos, len(self._buf)
                self.line += 1
                return bytes(self._buf[start:])
            scan -= self._fill()

    def _complete(self, end: re.Match[bytes]) -> bool:
        """Whether a line break found in the buffer is whole: a ``\\r`` at the very end of
        the buffer may be the first half of ``\\r\\n``, so the reader reads on to see."""
        return end.end() < len(self._buf) or end.group() != b"\r" or self._eof

    def _fill(self) -> int:
        """Drop what was consumed, read one more block; returns how far offsets moved."""
        moved = self._pos
        del self._buf[:moved]
        self._pos = 0
        data = self._stream.read(self._block)
        if data:
            self._buf += data
        else:
            self._eof = True
        return moved

    def _skip_line(self) -> None:
        """Read through the end of the current (too long) line, keeping nothing of it."""
        while True:
            found = _LINE_END.search(self._buf, self._pos)
            if found is not None and self._complete(found):
                self._pos = found.end()
                return
            # Keep only a trailing \r (it may pair with the next block's \n).
            self._pos = found.start() if found is not None else len(self._buf)
            if self._eof:
                self._pos = len(self._buf)
                return
            self._fill()


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def jsonl_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, str | None]]:
    """(line number, line) for every non-blank line; ``None`` for a line over the limit.

    Undecodable bytes stay lone surrogates.
    """
    lines = BoundedLines(stream, max_line_bytes)
    while True:
        lines.start_record()
        try:
            line = next(lines)
        except StopIteration:
            return
        except LineTooLong:
            yield lines.line, None
            continue
        if line.strip():
            yield lines.line, line


def parse_jsonl_line(line: str) -> dict[str, Any] | str:
    """The line's JSON object, or the reason it is not one."""
    if not _valid_utf8(line):
        return "not valid UTF-8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return "not valid JSON (nested too deeply)"
    except ValueError:  # the only other: an integer over Python's digit limit (4,300)
        return f"not valid JSON (a number with more than {sys.get_int_max_str_digits()} digits)"
    if not isinstance(record, dict):
        return "not a JSON object"
    return record


def csv_rows(
    stream: BinaryIO, max_record_bytes: int
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header row and an iterator of (first line number, cells) for every other row.

    A record (its lines, when quoted cells span several) over ``max_record_bytes`` is reported
    as that record's error; the reader goes on at the next line.

    Raises:
        UnreadableFile: The file has no header row.
    """
    lines = BoundedLines(stream, max_record_bytes)
    reader = csv.reader(lines, strict=False)
    try:
        header = next(reader)
    except StopIteration:
        raise UnreadableFile("the file is empty; a CSV needs a header row") from None
    except csv.Error as exc:
        raise UnreadableFile(f"the header row is not valid CSV ({exc})") from None
    except LineTooLong as exc:
        raise UnreadableFile(f"the header row is {exc}") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        while True:
            start = lines.line + 1
            lines.start_record()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a NUL byte; the reader moves on to the next line
                yield start, [f"\0csv error: {exc}"]
                continue
            except LineTooLong as exc:  # the reader starts again at the next line
                yield start, [f"\0csv error: the record is {exc} (BATCH_MAX_LINE_BYTES)"]
                continue
            if cells and any(c.strip() for c in cells):
                yield start, cells

    return [h.strip() for h in header], rows()


def csv_record(header: list[str], cells: list[str]) -> dict[str, str] | str:
    """The row as ``{column: cell}``, or the reason it cannot be read."""
    if len(cells) == 1 and cells[0].startswith("\0csv error: "):
        return cells[0].removeprefix("\0csv error: ")
    if not all(_valid_utf8(c) for c in cells):
        return "not valid UTF-8"
    if len(cells) != len(header):
        return f"{len(cells)} cells; the header row has {len(header)} columns"
    return dict(zip(header, cells, strict=True))
