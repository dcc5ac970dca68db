"""The evaluation cache: raw results (replies, per-chunk values) as JSON and the base logits
of llama-perplexity, keyed by the model file's SHA-256 and the settings that affect them."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..files import write_text_atomic
from .suite import default_cache_dir


def cache_key(*parts: Any) -> str:
    """A short, stable key of JSON-able parts (file names of the cache, keys of replies)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path` (folder created, written atomically by files.write_text_atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create the cache folder: {e.strerror}") from None
    write_text_atomic(path, json.dumps(data), force=True)


class EvalCache:
    """JSON results and base logits under one folder, keyed by file hash and settings.

    Layout: hashes.json (path, size, mtime -> sha256), <sha256>/<kind>-<key>.json, and
    logits/<base sha256>-<key>.bin (llama-perplexity --kl-divergence-base files, large:
    vocabulary x scored tokens x 2 bytes). Disabled: results and logits live in memory and a
    temporary folder for one call and nothing is read from earlier runs.
    """

    def __init__(self, root: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._memory: dict[Path, Any] = {}  # disabled: results live for this call only
        if enabled:
            self.root = Path(root) if root else default_cache_dir()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="gguf-surgeon-eval-")
            self.root = Path(self._tmp.name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def path(self, sha: str, kind: str, key: str) -> Path:
        return self.root / sha[:32] / f"{kind}-{key}.json"

    def load(self, sha: str, kind: str, key: str) -> Any:
        if not self.enabled:
            return self._memory.get(self.path(sha, kind, key))
        try:
            return json.loads(self.path(sha, kind, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, sha: str, kind: str, key: str, data: Any) -> None:
        if not self.enabled:
            self._memory[self.path(sha, kind, key)] = data
        else:
            try:
                _write_json(self.path(sha, kind, key), data)
            except (OSError, OutputError):
                pass  # a cache that cannot be written only costs a rerun

    def logits(self, sha: str, key: str) -> Path:
        return self.root / "logits" / f"{sha[:32]}-{key}.bin"

    def file_sha256(self, paths: Sequence[Path]) -> str:
        """SHA-256 of the files' bytes in order, memoized by (path, size, mtime)."""
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        memo_key = cache_key(stats)
        memo_path = self.root / "hashes.json"
        memo: dict[str, str] = {}
        if self.enabled:
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                memo = {}
            if memo_key in memo:
                return memo[memo_key]
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        sha = h.hexdigest()
        if self.enabled:
            memo[memo_key] = sha
            try:
                _write_json(memo_path, memo)
            except (OSError, OutputError):
                pass
        return sha
