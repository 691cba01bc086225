"""Plain text files (.txt, .text, .md, and any suffix no other reader claims), split into documents per the
source's `doc_boundary`: `file` (the whole file), `blank_line` (paragraphs separated by an empty line,
"\\n\\n") or `line`.

`line_documents` reads the lines of a byte range directly, so `slm prepare --part K/N` can cut a
one-document-per-line file inside and still see exactly the documents `datasets` gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources.base import FileReader, check_document_size, load_streaming

BOUNDARY_TO_SAMPLE_BY = {"file": "document", "blank_line": "paragraph", "line": "line"}


class TextReader(FileReader):
    format = "text"
    suffixes = (".txt", ".text", ".md")

    def dataset(self, source: SourceConfig, path: Path, encoding_errors: str) -> Any:
        return load_streaming(
            "text",
            path,
            sample_by=BOUNDARY_TO_SAMPLE_BY[source.doc_boundary],
            encoding_errors=None if encoding_errors == "strict" else encoding_errors,
        )

    def field(self, source: SourceConfig) -> str:
        return "text"


def line_documents(path: Path, start: int, end: int, encoding_errors: str) -> Iterator[str]:
    """The non-blank lines of a text file whose first byte lies in [start, end), as `datasets`' text
    builder reads them (universal newlines, split on \\n)."""
    errors = "strict" if encoding_errors == "strict" else encoding_errors
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line in progress belongs to the previous range
        while f.tell() < end:
            raw = f.readline()
            if not raw:
                return
            try:
                text = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not valid UTF-8 ({err.reason}); expected UTF-8 text, or set "
                    f"data.encoding_errors=replace to replace bad bytes."
                ) from None
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            pieces = text.split("\n")
            for line in pieces[:-1] if text.endswith("\n") else pieces:
                if line.strip():
                    check_document_size(line, f"{path} (the line at byte {f.tell() - len(raw)})")
                    yield line
