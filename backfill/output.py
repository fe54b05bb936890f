"""The output directory: ``cls.npy`` and ``mean.npy`` (float32, one row per manifest line, in
manifest order), ``status.npy`` (0 pending, 1 embedded, 2 failed), ``errors.jsonl`` and
``state.json`` (what was submitted, so an interrupted run resumes without redoing finished work).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

PENDING, EMBEDDED, FAILED = 0, 1, 2


class Output:
    def __init__(self, directory: Path, rows: int) -> None:
        self.directory = directory
        self.rows = rows
        directory.mkdir(parents=True, exist_ok=True)
        status_path = directory / "status.npy"
        if status_path.exists():
            self.status = np.lib.format.open_memmap(status_path, mode="r+")
            if self.status.shape != (rows,):
                raise SystemExit(f"{directory} holds the output of a different manifest ({self.status.shape[0]} rows, not {rows})")
        else:
            self.status = np.lib.format.open_memmap(status_path, mode="w+", dtype=np.uint8, shape=(rows,))
        self._vectors: dict[str, np.ndarray] = {}
        for name in ("cls", "mean"):
            if (directory / f"{name}.npy").exists():
                self._vectors[name] = np.lib.format.open_memmap(directory / f"{name}.npy", mode="r+")

    def write_vectors(self, row: int, cls: np.ndarray, mean: np.ndarray) -> None:
        for name, vector in (("cls", cls), ("mean", mean)):
            if name not in self._vectors:
                self._vectors[name] = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=np.float32, shape=(self.rows, vector.shape[0]))
            self._vectors[name][row] = vector
        self.status[row] = EMBEDDED

    def write_error(self, row: int, line: str, error: dict[str, Any]) -> None:
        shown = line if not line.startswith("data:") else line[:40] + "..."
        with open(self.directory / "errors.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps({"row": row, "input": shown, "error": error}) + "\n")
        self.status[row] = FAILED

    def flush(self) -> None:
        """Vectors reach the disk before the state that says they are there."""
        for array in (*self._vectors.values(), self.status):
            array.flush()

    def load_state(self) -> dict[str, Any]:
        path = self.directory / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_state(self, state: dict[str, Any]) -> None:
        self.flush()
        temporary = self.directory / "state.json.tmp"
        temporary.write_text(json.dumps(state, indent=1))
        os.replace(temporary, self.directory / "state.json")
