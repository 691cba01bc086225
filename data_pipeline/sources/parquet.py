"""Parquet files: one document per record, its text in the source's `text_field`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.config import SourceConfig
from data_pipeline.sources.base import FileReader, load_streaming


class ParquetReader(FileReader):
    format = "parquet"
    suffixes = (".parquet",)

    def dataset(self, source: SourceConfig, path: Path, encoding_errors: str) -> Any:
        return load_streaming("parquet", path)
