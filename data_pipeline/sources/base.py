"""What every source reader gives and shares: `Document`s with a resumable position, and `FileReader`, the
interface of one file type read through Hugging Face `datasets` with streaming=True (no corpus ever has to
fit in memory).

A new file type is one module: a `FileReader` subclass naming its suffixes, the `datasets` builder that
streams it and the field holding the text, listed in `corpus.READERS`. The shared loop here reads it in
Arrow batches, skips empty documents and turns every failure into a DataError naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Tuple

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError

READ_BATCH = 1024
"""Rows fetched from `datasets` per batch, as one Arrow table."""
MAX_DOCUMENT_CHARS = 8 * 2**20
"""Longest document (characters) prepare accepts: tokenizing one document holds ~100 bytes per character at
once (a 48 MB record peaked at 6 GB), so a longer one is refused naming its file and line (docs/guarantees.md)."""


def check_document_size(text: str, where: str) -> None:
    """Refuse a document too long to tokenize in bounded memory, naming where it is and what to do."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise DataError(
            f"{where}: a document of {len(text):,} characters; slm prepare accepts documents of at most "
            f"{MAX_DOCUMENT_CHARS:,} characters (tokenizing one holds ~100 bytes per character in memory). Split "
            "it into smaller documents (for plain text, doc_boundary: blank_line or line)."
        )


@dataclass(frozen=True)
class Document:
    file_index: int
    """Index of the file in the source's sorted file list (0 for a Hugging Face dataset)."""
    row: int
    """Row of the file the document came from (counting skipped empty rows), for resuming."""
    text: str


def load_streaming(builder: str, path: Path, **kwargs: Any) -> Any:
    """A local file as a streaming `datasets` dataset (datasets is imported here: it is heavy, and only
    reading raw sources needs it)."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kwargs)


def column_values(table: Any, field: str) -> List[Any]:
    """A column as Python values; datasets stores fields of mixed types as JSON text, decoded here."""
    column = table.column(field)
    values = column.to_pylist()
    if getattr(column.type, "extension_name", None) == "arrow.json":
        values = [None if value is None else json.loads(value) for value in values]
    return values


class FileReader:
    """One file type: which suffixes it reads, how `datasets` streams it, and how its errors are named."""

    format: str = ""
    """Its name in messages ("could not be read as ...")."""
    suffixes: Tuple[str, ...] = ()

    def dataset(self, source: SourceConfig, path: Path, encoding_errors: str) -> Any:
        """The file as a streaming `datasets` dataset."""
        raise NotImplementedError

    def field(self, source: SourceConfig) -> str:
        """The column holding the document text."""
        return source.text_field

    def where(self, path: Path, record: int) -> str:
        """A record's place, for messages."""
        return f"{path} (record {record + 1})"

    def failure(self, path: Path, err: Exception) -> DataError:
        """The DataError for a file `datasets` could not read."""
        if isinstance(err, UnicodeDecodeError):
            return DataError(
                f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); expected UTF-8 text, or set "
                f"data.encoding_errors=replace to replace bad bytes (they are counted in the summary)."
            )
        return DataError(f"{path} could not be read as {self.format} ({str(err).splitlines()[0]}).")

    def documents(
        self, source: SourceConfig, path: Path, file_index: int, start_row: int, encoding_errors: str
    ) -> Iterator[Document]:
        """The file's non-empty documents from row `start_row` on."""
        dataset = self.dataset(source, path, encoding_errors)
        if start_row:
            dataset = dataset.skip(start_row)
        row = start_row
        batches = dataset.with_format("arrow").iter(batch_size=READ_BATCH)  # 3x faster than Python dicts
        field = self.field(source)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                if field not in batch.column_names:
                    raise DataError(
                        f"{self.where(path, row)}: no field '{source.text_field}' (fields: "
                        f"{', '.join(batch.column_names) or 'none'}); "
                        f"set text_field of this source to the field that holds the document text."
                    )
                texts = column_values(batch, field)
            except DataError:
                raise
            except Exception as err:  # pyarrow / datasets parse errors: name the file and line instead
                raise self.failure(path, err) from None
            for offset, text in enumerate(texts):
                if not isinstance(text, str):
                    got = "missing" if text is None else f"of type {type(text).__name__}"
                    raise DataError(
                        f"{self.where(path, row + offset)}: field '{source.text_field}' is {got}; expected a "
                        f"string with the document text in every record."
                    )
                if text.strip():
                    check_document_size(text, self.where(path, row + offset))
                    yield Document(file_index, row + offset, text)
            row += len(texts)
