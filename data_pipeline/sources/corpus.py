"""A configured source as a corpus: its name, its files, its documents in a fixed order, and its fingerprint.

A source's `path` is a local file, a directory (every file under it), a glob, or else a Hugging Face
dataset name (hub.py). Each local file is read by the reader of its suffix (READERS: text.py, jsonl.py,
parquet.py; text for any other suffix). Documents that are empty or only whitespace are skipped.

Every document has a position (file index, row within the file) so that an interrupted prepare can
restart exactly after the last document it committed.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources.base import Document, FileReader
from data_pipeline.sources.hub import hub_documents
from data_pipeline.sources.jsonl import JsonReader
from data_pipeline.sources.parquet import ParquetReader
from data_pipeline.sources.text import TextReader

TEXT = TextReader()
READERS: Sequence[FileReader] = (TEXT, JsonReader(), ParquetReader())
"""One reader per file type; a file whose suffix none of them names is read as text."""
GLOB_CHARS = re.compile(r"[*?\[]")


def has_glob(path: str) -> bool:
    return bool(GLOB_CHARS.search(path))


def looks_local(path: str) -> bool:
    """A path we should read from disk (and report as missing) rather than ask the Hugging Face Hub for."""
    p = Path(path).expanduser()
    if p.exists() or has_glob(path) or path.startswith(("/", "./", "../", "~")):
        return True
    return any(p.suffix.lower() in reader.suffixes for reader in READERS)


def source_name(source: SourceConfig) -> str:
    """The source's name in the manifest and in `weights`: `name`, else the file stem (or folder) of `path`."""
    if source.name:
        raw = source.name
    else:
        parts = [
            part for part in Path(source.path).parts if not has_glob(part) and part not in ("/", ".", "..")
        ]
        last = Path(source.path).name
        raw = Path(last).stem if last and not has_glob(last) else (parts[-1] if parts else "source")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._")
    return name or "source"


def source_names(sources: Sequence[SourceConfig]) -> List[str]:
    names = [source_name(s) for s in sources]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise DataError(
                f"data.sources[{names.index(name)}] ({sources[names.index(name)].path}) and data.sources[{i}] "
                f"({sources[i].path}) are both named '{name}'; give one of them a distinct `name`."
            )
    return names


def source_weights(data_cfg: DataConfig) -> Dict[str, float]:
    """Source name -> mixing weight, with the names `slm prepare` writes into the manifest."""
    return dict(zip(source_names(data_cfg.sources), (float(s.weight) for s in data_cfg.sources)))


def reader_of(path: Path) -> FileReader:
    """The reader of a file's type (by suffix; text when no reader names it)."""
    suffix = path.suffix.lower()
    return next((reader for reader in READERS if suffix in reader.suffixes), TEXT)


def file_format(path: Path) -> str:
    return reader_of(path).format


def resolve_files(source: SourceConfig) -> List[Path]:
    """The sorted local files of a source (empty list for a Hugging Face dataset name)."""
    if not looks_local(source.path):
        return []
    path = Path(source.path).expanduser()
    if has_glob(source.path):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        what = "glob"
    elif path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        what = "directory"
    elif path.is_file():
        files = [path]
        what = "file"
    else:
        raise DataError(
            f"Source path {source.path} does not exist; expected a file, a directory or a glob of text, jsonl/json or parquet files."
        )
    if not files:
        raise DataError(
            f"Source {what} {source.path} matches no files; expected text, jsonl/json or parquet files."
        )
    return sorted(files)


def iter_documents(
    source: SourceConfig, encoding_errors: str = "strict", start: tuple = (0, 0)
) -> Iterator[Document]:
    """Stream a source's documents in a fixed order, starting at position (file index, row)."""
    files = resolve_files(source)
    if not files:
        yield from hub_documents(source, start[1])
        return
    first_file, first_row = start
    for index in range(first_file, len(files)):
        yield from reader_of(files[index]).documents(
            source, files[index], index, first_row if index == first_file else 0, encoding_errors
        )


def describe_source(source: SourceConfig) -> str:
    files = resolve_files(source)
    if not files:
        return f"Hugging Face dataset {source.path} (split {source.hf_split})"
    return str(files[0]) if len(files) == 1 else f"{source.path} ({len(files)} files)"


def source_fingerprint(source: SourceConfig) -> Dict[str, Any]:
    """What determines a source's documents: where they come from and how they are split (not the weight)."""
    files = resolve_files(source)
    return {
        "name": source_name(source),
        "path": source.path,
        "text_field": source.text_field,
        "doc_boundary": source.doc_boundary,
        "hf_split": source.hf_split if not files else None,
        "files": [[str(f), f.stat().st_size] for f in files],
    }
