"""The output directory.

``cls.npy`` and ``mean.npy`` (one row per manifest line, in manifest order, in the chosen encoding:
float32, int8 or uint8, packed bits for binary/ubinary), ``status.npy`` (0 pending, 1 embedded,
2 failed), ``errors.jsonl`` and ``state.json`` (what was submitted, so an interrupted run resumes
without redoing finished work). The ``.npy`` files are written in place by row, which is what makes a
run resumable; ``--format parquet`` also writes ``embeddings.parquet`` from them once no row is pending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PENDING, EMBEDDED, FAILED = 0, 1, 2
DTYPES = {"float": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
PARQUET = "embeddings.parquet"
PARQUET_ROW_GROUP = 65_536  # rows per row group: bounds the memory a write takes, whatever the manifest size


class Output:
    def __init__(self, directory: Path, rows: int, encoding: str) -> None:
        self.directory = directory
        self.rows = rows
        self.dtype = np.dtype(DTYPES[encoding])
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
                self._vectors[name] = np.lib.format.open_memmap(self.directory / f"{name}.npy", mode="w+", dtype=self.dtype, shape=(self.rows, vector.shape[0]))
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

    def write_parquet(self, ids: list[str] | None) -> Path:
        """``id``, ``cls``, ``mean`` for every embedded row, in manifest order (failed rows are in
        errors.jsonl). Vectors are fixed-size lists of the encoding's type; ids are the manifest's
        strings, or the row number when it gives none. Written whole to a temporary file, then renamed."""
        embedded = np.flatnonzero(self.status == EMBEDDED)
        dims = {name: self._vectors[name].shape[1] for name in ("cls", "mean")} if self._vectors else {"cls": 0, "mean": 0}
        value_type = pa.from_numpy_dtype(self.dtype)
        schema = pa.schema(
            [
                pa.field("id", pa.string() if ids is not None else pa.int64(), nullable=False),
                *[pa.field(name, pa.list_(value_type, dims[name]), nullable=False) for name in ("cls", "mean")],
            ]
        )
        temporary = self.directory / f"{PARQUET}.tmp"
        with pq.ParquetWriter(temporary, schema) as writer:
            for start in range(0, len(embedded), PARQUET_ROW_GROUP):
                rows = embedded[start : start + PARQUET_ROW_GROUP]
                columns = [pa.array([ids[row] for row in rows], pa.string()) if ids is not None else pa.array(rows, pa.int64())]
                for name in ("cls", "mean"):
                    flat = pa.array(np.ascontiguousarray(self._vectors[name][rows]).reshape(-1), value_type)
                    columns.append(pa.FixedSizeListArray.from_arrays(flat, dims[name]))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        os.replace(temporary, self.directory / PARQUET)
        return self.directory / PARQUET
