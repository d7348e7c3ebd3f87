"""Counters of job outcomes and rejection reasons; names only, never content."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import Mapping


class WorkerStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()
        self._rejections: Counter[str] = Counter()

    def outcome(self, name: str) -> None:
        with self._lock:
            self._outcomes[name] += 1

    def rejected(self, reason: str) -> None:
        with self._lock:
            self._rejections[reason] += 1
            self._outcomes["rejected"] += 1

    def snapshot(self) -> Mapping[str, Mapping[str, int]]:
        with self._lock:
            return MappingProxyType({"outcomes": dict(self._outcomes), "rejections": dict(self._rejections)})

    def write(self, path: Path) -> None:
        """Replace `path` atomically with the counters as JSON."""
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(self.snapshot()), sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
