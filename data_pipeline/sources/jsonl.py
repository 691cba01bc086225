"""JSON lines (.jsonl, .ndjson) and JSON array (.json) files: one document per record, its text in the
source's `text_field`. Errors name the file and line (`datasets` itself only says "row N")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources.base import FileReader, load_streaming


def _line_of_record(path: Path, record: int) -> Optional[int]:
    """1-based line of the `record`-th non-blank line of a jsonl file (None for other layouts)."""
    if path.suffix.lower() == ".json":
        return None
    seen = -1
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == record:
                    return number
    return None


def _explain_json_failure(path: Path, err: Exception) -> DataError:
    """Find the first line that is not UTF-8 or not a JSON object, to name it; datasets only says 'row N'."""
    if path.suffix.lower() != ".json":
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return DataError(
                        f"{path}:{number}: not valid UTF-8 ({bad.reason} at byte {bad.start}); expected UTF-8 JSON lines."
                    )
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as bad:
                    return DataError(
                        f"{path}:{number}: not valid JSON ({bad.msg} at column {bad.colno}); expected one JSON object per line."
                    )
                if not isinstance(value, dict):
                    return DataError(
                        f"{path}:{number}: a JSON {type(value).__name__}, expected one JSON object per line."
                    )
    if isinstance(err, UnicodeDecodeError):
        return DataError(
            f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); JSON files must be UTF-8."
        )
    return DataError(
        f"{path} could not be read as JSON ({str(err).splitlines()[0]}); expected JSON lines or a JSON array of objects."
    )


class JsonReader(FileReader):
    format = "json"
    suffixes = (".jsonl", ".json", ".ndjson")

    def dataset(self, source: SourceConfig, path: Path, encoding_errors: str) -> Any:
        return load_streaming("json", path)

    def where(self, path: Path, record: int) -> str:
        line = _line_of_record(path, record)
        return f"{path}:{line}" if line is not None else f"{path} (record {record + 1})"

    def failure(self, path: Path, err: Exception) -> DataError:
        return _explain_json_failure(path, err)
