"""The model-source step: turn a source spec into a prepared model directory, at build time.

A function never fetches a model while serving; this step runs before (``make model``, the
container's model stage) and writes a standard Hugging Face directory plus ``aifn-model.json``
saying where it came from. Sources::

    recipe:functions/sentiment/recipe.py   train with a recipe file (see below)
    gs://bucket/prefix                     download every object under the prefix
    hf://org/name@revision                 a Hub snapshot at a pinned revision (needs Hub access)
    /path/to/dir  (or file:///path)        copy a local model directory

Each result is cached twice over, by the source's fingerprint (the recipe's inputs, the objects'
checksums, the Hub revision, the local files' hashes): when it matches the one recorded in the
destination's ``aifn-model.json`` the step does nothing, and when the machine's prepared-model
cache (:mod:`aifn.build.model_cache`) holds it, it is copied from there instead of being
rebuilt. The directory is built beside the destination and swapped in only once it passes
:func:`aifn.core.model.check_model_dir`, so a failed or interrupted run never leaves a broken model
behind.

A recipe file defines ``NAME``, ``fingerprint() -> dict`` (everything its output depends on) and
``build(dest: Path) -> dict`` (train into ``dest``, return the evaluation figures).

Usage: ``python -m aifn.build.model_source --source SPEC --dest DIR [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from aifn.build import export, model_cache
from aifn.core.errors import ConfigError
from aifn.core.model import (
    BUILD_INFO,
    FLOAT32_GRAPH,
    IDENTITY_FILES,
    check_model_dir,
    hash_files,
    read_info,
    served_graph,
)

log = logging.getLogger(__name__)

_HF = re.compile(r"^hf://(?P<repo>[\w.-]+(?:/[\w.-]+)?)@(?P<revision>[\w./-]+)$")
_HF_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """A parsed source spec."""

    kind: str  # "recipe" | "gcs" | "hf" | "local"
    spec: str
    location: str  # recipe path, "bucket/prefix", "repo", or local path
    revision: str | None = None


def parse(spec: str) -> Source:
    """Parse a source spec; raises :class:`ConfigError` with the accepted forms on a bad one."""
    spec = spec.strip()
    if spec.startswith("recipe:"):
        path = spec.removeprefix("recipe:")
        if not path.endswith(".py"):
            raise ConfigError(f"recipe source must name a .py file: {spec!r}")
        return Source("recipe", spec, path)
    if spec.startswith("gs://"):
        rest = spec.removeprefix("gs://").strip("/")
        if not rest or ("/" not in rest and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}", rest)):
            raise ConfigError(f"invalid gs:// source {spec!r}; expected gs://bucket/prefix")
        return Source("gcs", spec, rest)
    if spec.startswith("hf://"):
        m = _HF.match(spec)
        if not m:
            raise ConfigError(
                f"invalid Hub source {spec!r}; expected hf://org/name@revision with a pinned "
                "revision (a commit sha), so builds are reproducible"
            )
        return Source("hf", spec, m.group("repo"), m.group("revision"))
    path = spec.removeprefix("file://")
    if not path:
        raise ConfigError("empty model source")
    return Source("local", spec, path)


def load_recipe(path: Path) -> ModuleType:
    """Import a recipe file (see the module docstring) and check it defines what is needed."""
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    # The recipe's own folder goes first on the path, as when running it as a script.
    sys.path.insert(0, str(path.parent.resolve()))
    module_spec = importlib.util.spec_from_file_location(
        f"aifn_recipe_{path.parent.name}_{path.stem}", path
    )
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import recipe {path}")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as a normal import would be (dataclasses look themselves up).
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    for attr in ("NAME", "fingerprint", "build"):
        if not hasattr(module, attr):
            raise ConfigError(f"recipe {path} does not define {attr}")
    return module


def _gcs_split(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.partition("/")
    return bucket, (prefix.rstrip("/") + "/") if prefix else ""


def _gcs_blobs(location: str) -> list[Any]:
    from google.cloud import storage

    bucket, prefix = _gcs_split(location)
    blobs = [
        b for b in storage.Client().list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")
    ]
    if not blobs:
        raise ConfigError(f"no objects under gs://{bucket}/{prefix}")
    return blobs


def _tree_hash(path: Path) -> str:
    return hash_files(
        path, sorted(p for p in path.rglob("*") if p.is_file() and p.name != BUILD_INFO)
    )


def fingerprint(source: Source) -> tuple[str, dict[str, Any]]:
    """(name, fingerprint) of a source, without fetching or building anything."""
    if source.kind == "recipe":
        recipe = load_recipe(Path(source.location))
        return str(recipe.NAME), {"kind": "recipe", **recipe.fingerprint()}
    if source.kind == "gcs":
        _, prefix = _gcs_split(source.location)
        objects = sorted(
            (b.name.removeprefix(prefix), b.crc32c or b.md5_hash or "", b.size or 0)
            for b in _gcs_blobs(source.location)
        )
        return f"gs://{source.location}", {
            "kind": "gcs",
            "objects": objects,
            **export.fingerprint(),
        }
    if source.kind == "hf":
        return source.location, {
            "kind": "hf",
            "repo": source.location,
            "revision": source.revision,
            **export.fingerprint(),
        }
    path = Path(source.location).expanduser()
    if not path.is_dir():
        raise ConfigError(f"local model source {path} is not a directory")
    # A directory this step prepared before (e.g. models/<function>, copied into an image)
    # keeps the name it was built under, so the copy serves the same model identity.
    recorded = (read_info(path) or {}).get("name")
    name = recorded if isinstance(recorded, str) and recorded else path.resolve().name
    return name, {"kind": "local", "sha256": _tree_hash(path), **export.fingerprint()}


def _fetch(source: Source, tmp: Path) -> dict[str, Any]:
    """Materialise the source into the empty directory ``tmp``; return figures to record.

    A recipe exports its model itself (with the held-out data that measures each int8 plan). Any
    other source is exported here, in float32: there is no held-out data to measure a plan on.
    A local directory this step prepared before keeps its graphs and recorded figures.
    """
    if source.kind == "recipe":
        recipe = load_recipe(Path(source.location))
        return dict(recipe.build(tmp))
    if source.kind == "gcs":
        bucket, prefix = _gcs_split(source.location)
        for blob in _gcs_blobs(source.location):
            rel = blob.name.removeprefix(prefix)
            target = (tmp / rel).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise ConfigError(f"object name escapes the model directory: {blob.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
            log.info("downloaded gs://%s/%s (%s bytes)", bucket, blob.name, blob.size)
        return _export_if_needed(tmp, {})
    if source.kind == "hf":
        from huggingface_hub import snapshot_download

        if not _HF_COMMIT.match(source.revision or ""):
            log.warning(
                "Hub revision %r is not a commit sha; a branch or tag can move under you",
                source.revision,
            )
        snapshot_download(
            repo_id=source.location,
            revision=source.revision,
            local_dir=tmp,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "README.md"],
        )
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        return _export_if_needed(tmp, {})
    path = Path(source.location).expanduser()
    shutil.copytree(path, tmp, dirs_exist_ok=True)
    (tmp / BUILD_INFO).unlink(missing_ok=True)
    # ... and its recorded figures, which include the int8 plan QUANTIZE=auto serves.
    metrics = (read_info(path) or {}).get("metrics")
    return _export_if_needed(tmp, dict(metrics) if isinstance(metrics, dict) else {})


def _export_if_needed(tmp: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Export ``tmp`` to ONNX in float32 unless it holds a graph already; the figures to record."""
    if (tmp / FLOAT32_GRAPH).is_file() or any((tmp / "onnx").glob("model.*.onnx")):
        return metrics
    # Graphs from an earlier export would not match these weights.
    shutil.rmtree(tmp / "onnx", ignore_errors=True)
    metrics = {k: v for k, v in metrics.items() if k not in {"onnx", "quantization"}}
    return {**metrics, "onnx": export.export(tmp)}


def serving_copy(src: Path, dest: Path, *, quantize: str = "auto") -> list[str]:
    """Copy to the new directory ``dest`` only what serving reads of the prepared ``src``.

    That is the config and tokenizer files, the build record and model card, and the one graph
    ``QUANTIZE=quantize`` serves (not the safetensors weights, nor the other graph): what a
    container image needs. Returns the files copied, relative to ``dest``.
    """
    check_model_dir(src)
    graph, _ = served_graph(src, quantize)
    names = [n for n in (*IDENTITY_FILES, BUILD_INFO, "README.md", graph) if (src / n).is_file()]
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)
    return names


def prepare(spec: str, dest: Path, *, force: bool = False) -> dict[str, Any]:
    """Make ``dest`` hold the model ``spec`` describes, reusing it when nothing changed.

    Returns:
        The ``aifn-model.json`` record, with ``"cached": True`` when nothing was rebuilt.
    """
    source = parse(spec)
    name, fp = fingerprint(source)
    return build_cached(
        dest,
        name=name,
        source=spec,
        fingerprint=fp,
        build=lambda tmp: _fetch(source, tmp),
        force=force,
        # A local directory is already a copy at hand; the cache's would only be a third one.
        shared=source.kind != "local",
    )


def build_cached(
    dest: Path,
    *,
    name: str,
    source: str,
    fingerprint: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    force: bool = False,
    shared: bool = True,
) -> dict[str, Any]:
    """Make ``dest`` hold the model of ``fingerprint``: kept, restored from the cache, or built.

    In order: ``dest`` already built from the same fingerprint is kept as it is; else the
    prepared-model cache (:mod:`aifn.build.model_cache`) holds a verified copy, which is copied in;
    else ``build(tmp)`` fills an empty directory beside ``dest`` and returns figures to record,
    and the result is stored in the cache. Either way the new directory replaces ``dest`` only
    once it passes :func:`aifn.core.model.check_model_dir`, so a failed or interrupted run
    leaves the previous model in place. ``force`` skips both shortcuts (and replaces the cache
    entry);
    ``shared=False`` keeps this model out of the cache (a local copy is already a copy).

    Returns:
        The ``aifn-model.json`` record, with ``"cached": True`` when nothing was rebuilt and
        ``"restored_from"`` naming the cache entry when it was copied from there.
    """
    fp = json.loads(json.dumps(fingerprint))  # compare as stored: tuples become lists in JSON
    current = read_info(dest)
    if not force and current is not None and current.get("fingerprint") == fp:
        try:
            check_model_dir(dest)
        except ConfigError as exc:
            log.warning("cached model is unusable, rebuilding: %s", exc)
        else:
            return {**current, "cached": True}

    cache = model_cache.ModelCache.from_env() if shared else None
    entry_key = model_cache.key(name, fp)
    with cache.locked(entry_key) if cache is not None else contextlib.nullcontext():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started = time.perf_counter()
        try:
            entry = None if cache is None or force else _restore(cache, entry_key, tmp)
            if entry is not None:
                # The build's record (when, how long, its figures), under the source named now.
                info = {**(read_info(tmp) or {}), "source": source}
                (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                result = {**info, "cached": True, "restored_from": str(entry)}
                log.info(
                    "%s: restored from the model cache (%s) in %.1f s",
                    dest,
                    entry,
                    time.perf_counter() - started,
                )
            else:
                metrics = build(tmp)
                check_model_dir(tmp)
                info = {
                    "name": name,
                    "source": source,
                    "fingerprint": fp,
                    "environment": model_cache.environment(),
                    "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "prepare_seconds": round(time.perf_counter() - started, 1),
                    "metrics": metrics,
                }
                (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                result = {**info, "cached": False}
                if cache is not None:
                    stored = cache.store(entry_key, tmp)
                    log.info("%s: stored in the model cache as %s", dest, stored)
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


def _restore(cache: model_cache.ModelCache, entry_key: str, tmp: Path) -> Path | None:
    """Copy the cache's entry into the empty ``tmp``; ``None`` (and ``tmp`` empty) if unusable."""
    entry = cache.restore(entry_key, tmp)
    if entry is not None:
        try:
            check_model_dir(tmp)
        except ConfigError as exc:  # e.g. stored before a check it now fails was added
            log.warning("model cache entry %s fails the model checks, rebuilding: %s", entry, exc)
            cache.remove(entry_key)
            entry = None
    if entry is None:
        shutil.rmtree(tmp)
        tmp.mkdir()
    return entry


def outcome(info: dict[str, Any], *, built: str) -> str:
    """How :func:`build_cached` got its model, for a command's output; ``built`` if it built it."""
    if "restored_from" in info:
        return f"restored from the model cache ({info['restored_from']})"
    return "up to date (cached)" if info["cached"] else built


def quiet_library_progress_bars() -> None:
    """Keep the log to our own progress bar: no per-file bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.build.model_source", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--source", required=True, help="recipe:FILE.py, gs://, hf://, or a dir")
    parser.add_argument("--dest", required=True, type=Path, help="model directory to prepare")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--serving-copy",
        type=Path,
        metavar="DIR",
        help="then copy only what serving reads (config, tokenizer, the served graph) to DIR",
    )
    args = parser.parse_args(argv)
    quiet_library_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        info = prepare(args.source, args.dest, force=args.force)
    except ConfigError as exc:
        print(f"model source: {exc}", file=sys.stderr)
        return 2
    verb = outcome(info, built=f"prepared in {info['prepare_seconds']} s")
    print(f"{args.dest}: {info['name']} from {info['source']}: {verb}")
    for key, value in info.get("metrics", {}).items():
        if not isinstance(value, dict):
            print(f"  {key}: {value}")
    if args.serving_copy:
        try:
            files = serving_copy(args.dest, args.serving_copy)
        except ConfigError as exc:
            print(f"model source: {exc}", file=sys.stderr)
            return 2
        print(f"{args.serving_copy}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
