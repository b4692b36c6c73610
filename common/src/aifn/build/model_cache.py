"""The prepared-model cache: every model a build makes, kept by its build fingerprint.

The model-source step (``make model``) and ``make train`` are deterministic: the same inputs
(recipe, data, training and export code, base model, library versions: the *fingerprint*) give the
same weights, byte for byte. So each model they build is also stored here, outside the clone,
and the next build of the same fingerprint (a second clone, ``make clean``, CI on a machine that
built it before) copies it back in seconds instead of training again. A changed input is a new
fingerprint, so a new entry and a real build; nothing is ever looked up by name or age. The key
also covers the build environment (Python and the versions of the libraries in
:data:`ENVIRONMENT_PACKAGES`), so an upgrade rebuilds even where a recipe does not name them.

Layout, under the root (``AIFN_MODEL_CACHE``, else ``$AIFN_CACHE_DIR/models``, else
``${XDG_CACHE_HOME:-~/.cache}/aifn/models``; ``AIFN_MODEL_CACHE=off`` disables it)::

    <key>/                 a complete model directory, plus MANIFEST (each file's SHA-256)
    .<key>.lock            held while one process looks up, builds or stores <key>
    .tmp-<key>-<pid>-*/    an entry being written; never read, removed by whoever finds it stale

An entry only ever appears by an atomic rename of a finished directory, so a partial entry cannot
be used; each file is hashed as it is copied out and must match the manifest, and an entry that no
longer matches (disk trouble, a hand edit) is deleted and rebuilt. Builds of the same key
serialise on its lock, so two concurrent ``make model`` runs train once and both get the result.

Usage: ``python -m aifn.build.model_cache [list | clear | path]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "aifn-cache-manifest.json"
# Bumped when the entry layout changes, so old entries are never misread.
FORMAT = 1
_DISABLED = {"", "0", "off", "false", "no", "none"}


def cache_home() -> Path:
    """The machine's cache for this project: ``AIFN_CACHE_DIR``, else ``$XDG_CACHE_HOME/aifn``."""
    base = os.environ.get("AIFN_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aifn"


def default_root() -> Path | None:
    """Where entries live, from the environment; ``None`` when the cache is disabled."""
    setting = os.environ.get("AIFN_MODEL_CACHE")
    if setting is not None:
        if setting.strip().lower() in _DISABLED:
            return None
        return Path(setting).expanduser()
    return cache_home() / "models"


# Libraries whose version can change a build's bytes even where a recipe's fingerprint does not
# name them (tokenization, weight serialisation, array maths, ONNX export, quantization and the
# runtime the plans are measured on). Part of every key, with Python's.
ENVIRONMENT_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "onnx",
    "onnxruntime",
)


def environment() -> dict[str, str]:
    """The build environment every key includes: Python's version and those libraries'."""
    versions = {"python": platform.python_version()}
    for package in ENVIRONMENT_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def key(name: str, fingerprint: dict[str, Any]) -> str:
    """The entry name for a model: SHA-256 of its name, fingerprint and :func:`environment`."""
    canonical = json.dumps(
        {"format": FORMAT, "name": name, "fingerprint": fingerprint, "env": environment()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _copy(src: Path, dst: Path, *, fsync: bool = False) -> str:
    """Copy one file in a single pass; returns the SHA-256 of the bytes written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
            fout.write(block)
        if fsync:
            fout.flush()
            os.fsync(fout.fileno())
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


@dataclass(frozen=True)
class ModelCache:
    """A directory of prepared models, one per build fingerprint."""

    root: Path

    @classmethod
    def from_env(cls) -> ModelCache | None:
        root = default_root()
        return None if root is None else cls(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold ``key``'s lock: one process at a time looks up, builds and stores it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".{key}.lock").open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(
                    f"waiting for another build of the same model (model cache entry {key})",
                    file=sys.stderr,
                    flush=True,
                )
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def restore(self, key: str, dest: Path) -> Path | None:
        """Copy ``key``'s entry (not its manifest) into the empty directory ``dest``.

        Each file is hashed as it is copied and must match the manifest, so what lands in
        ``dest`` is what was stored. An entry that fails is deleted (it would fail again) and
        ``None`` returned, with ``dest`` left partly filled for the caller to discard. Call with
        the key's lock held.
        """
        path = self.entry(key)
        if not path.is_dir():
            return None
        problem = self._copy_verified(path, key, dest)
        if problem is None:
            return path
        log.warning("model cache entry %s is unusable (%s); removing it, rebuilding", path, problem)
        self._remove(path)
        return None

    def remove(self, key: str) -> None:
        """Delete ``key``'s entry, if any. Call with the key's lock held."""
        self._remove(self.entry(key))

    def _copy_verified(self, path: Path, key: str, dest: Path) -> str | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"no readable manifest: {exc}"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return "written by another version of this cache"
        if manifest.get("key") != key:
            return f"manifest is for {manifest.get('key')!r}"
        expected = manifest.get("files")
        if not isinstance(expected, dict):
            return "manifest lists no files"
        present = {str(p.relative_to(path)) for p in _files(path)}
        if present != set(expected):
            return f"files differ from the manifest: {sorted(present ^ set(expected))[:3]}"
        for rel, digest in expected.items():
            if _copy(path / rel, dest / rel) != digest:
                return f"{rel} does not match its SHA-256"
        return None

    def store(self, key: str, src: Path) -> Path:
        """Store a copy of the finished model directory ``src`` as ``key``; returns the entry.

        Written to a temporary directory beside the entries, then renamed into place: readers
        see either no entry or a complete one. An existing entry for the key is replaced (a
        forced rebuild stores its result). Call with the key's lock held.
        """
        self._remove_stale_tmp()
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tmp.mkdir(parents=True)
            files = {}
            for file in _files(src):
                rel = str(file.relative_to(src))
                files[rel] = _copy(file, tmp / rel, fsync=True)
            manifest = {"format": FORMAT, "key": key, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            path = self.entry(key)
            if path.exists():
                self._remove(path)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _remove(self, path: Path) -> None:
        """Take ``path`` out of sight with one rename, then delete it."""
        doomed = self.root / f".tmp-removed-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        """Delete temporary directories whose writer is gone (a killed build)."""
        for tmp in self.root.glob(".tmp-*"):
            pid = _pid_of(tmp.name)
            if pid is None or not _alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)

    def entries(self) -> list[dict[str, Any]]:
        """Each complete entry's key, model name, size and when it was built (not verified)."""
        out = []
        for path in sorted(self.root.glob("*")) if self.root.is_dir() else []:
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                info = json.loads((path / "aifn-model.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            out.append(
                {
                    "key": path.name,
                    "name": info.get("name", "?"),
                    "prepared_at": info.get("prepared_at", "?"),
                    "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                }
            )
        return out

    def clear(self) -> int:
        """Delete every entry (and every leftover); returns the bytes freed."""
        freed = sum(int(e["bytes"]) for e in self.entries())
        if self.root.is_dir():
            shutil.rmtree(self.root)
        return freed


def _pid_of(name: str) -> int | None:
    # .tmp-<key>-<pid>-<ns> and .tmp-removed-<key>-<pid>-<ns>
    parts = name.split("-")
    try:
        return int(parts[-2])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aifn.build.model_cache", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", nargs="?", default="list", choices=["list", "clear", "path"])
    args = parser.parse_args(argv)
    cache = ModelCache.from_env()
    if cache is None:
        print("the model cache is disabled (AIFN_MODEL_CACHE=off)")
        return 0
    if args.command == "path":
        print(cache.root)
    elif args.command == "clear":
        freed = cache.clear()
        print(f"emptied {cache.root} ({freed / 1e6:.0f} MB)")
    else:
        entries = cache.entries()
        for e in entries:
            print(f"{e['key']}  {e['bytes'] / 1e6:7.0f} MB  {e['prepared_at']}  {e['name']}")
        total = sum(e["bytes"] for e in entries)
        print(f"{len(entries)} models, {total / 1e6:.0f} MB in {cache.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
