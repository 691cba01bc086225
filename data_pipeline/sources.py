"""Raw corpora as streams of documents, read through Hugging Face `datasets` with streaming=True so that
no corpus ever has to fit in memory.

A source's `path` is a local file, a directory (every file under it), a glob, or else a Hugging Face
dataset name: `load_dataset(name, split=hf_split, streaming=True)` (needs a machine that is online, so the
test suite cannot exercise it). Plain text splits into documents per `doc_boundary`: `file` (whole file),
`blank_line` (paragraphs separated by an empty line, "\\n\\n") or `line`. jsonl/json and parquet records
carry the document in `text_field`. Documents that are empty or only whitespace are skipped.

Every document has a position (file index, row within the file) so that an interrupted prepare can
restart exactly after the last document it committed.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
GLOB_CHARS = re.compile(r"[*?\[]")
READ_BATCH = 1024
"""Rows fetched from `datasets` per batch, as one Arrow table."""
BOUNDARY_TO_SAMPLE_BY = {"file": "document", "blank_line": "paragraph", "line": "line"}


@dataclass(frozen=True)
class Document:
    file_index: int
    """Index of the file in the source's sorted file list (0 for a Hugging Face dataset)."""
    row: int
    """Row of the file the document came from (counting skipped empty rows), for resuming."""
    text: str


def has_glob(path: str) -> bool:
    return bool(GLOB_CHARS.search(path))


def looks_local(path: str) -> bool:
    """A path we should read from disk (and report as missing) rather than ask the Hugging Face Hub for."""
    p = Path(path).expanduser()
    if p.exists() or has_glob(path) or path.startswith(("/", "./", "../", "~")):
        return True
    return p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


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


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


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


def _where(path: Path, record: int) -> str:
    line = _line_of_record(path, record) if file_format(path) == "json" else None
    return f"{path}:{line}" if line is not None else f"{path} (record {record + 1})"


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


def _load(builder: str, path: Path, **kwargs: Any) -> Any:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kwargs)


def _iter_file(
    source: SourceConfig, path: Path, file_index: int, start_row: int, encoding_errors: str
) -> Iterator[Document]:
    fmt = file_format(path)
    if fmt == "text":
        dataset = _load(
            "text",
            path,
            sample_by=BOUNDARY_TO_SAMPLE_BY[source.doc_boundary],
            encoding_errors=None if encoding_errors == "strict" else encoding_errors,
        )
    else:
        dataset = _load(fmt, path)
    if start_row:
        dataset = dataset.skip(start_row)
    row = start_row
    batches = dataset.with_format("arrow").iter(batch_size=READ_BATCH)  # 3x faster than Python dicts
    field = "text" if fmt == "text" else source.text_field
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            if field not in batch.column_names:
                raise DataError(
                    f"{_where(path, row)}: no field '{source.text_field}' (fields: {', '.join(batch.column_names) or 'none'}); "
                    f"set text_field of this source to the field that holds the document text."
                )
            texts = _column_values(batch, field)
        except UnicodeDecodeError as err:
            if fmt == "json":
                raise _explain_json_failure(path, err) from None
            raise DataError(
                f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); expected UTF-8 text, or set "
                f"data.encoding_errors=replace to replace bad bytes (they are counted in the summary)."
            ) from None
        except DataError:
            raise
        except Exception as err:  # pyarrow / datasets parse errors: name the file and line instead
            if fmt == "json":
                raise _explain_json_failure(path, err) from None
            raise DataError(f"{path} could not be read as {fmt} ({str(err).splitlines()[0]}).") from None
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                got = "missing" if text is None else f"of type {type(text).__name__}"
                raise DataError(
                    f"{_where(path, row + offset)}: field '{source.text_field}' is {got}; expected a string "
                    f"with the document text in every record."
                )
            if text.strip():
                yield Document(file_index, row + offset, text)
        row += len(texts)


def _column_values(table: Any, field: str) -> List[Any]:
    """A column as Python values; datasets stores fields of mixed types as JSON text, decoded here."""
    column = table.column(field)
    values = column.to_pylist()
    if getattr(column.type, "extension_name", None) == "arrow.json":
        values = [None if value is None else json.loads(value) for value in values]
    return values


def _iter_hub(source: SourceConfig, start_row: int) -> Iterator[Document]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, split=source.hf_split, streaming=True)
        if start_row:
            dataset = dataset.skip(start_row)
        for row, record in enumerate(dataset, start=start_row):
            text = record.get(source.text_field)
            if not isinstance(text, str):
                raise DataError(
                    f"Hugging Face dataset {source.path} row {row}: field '{source.text_field}' is not a string."
                )
            if text.strip():
                yield Document(0, row, text)
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"Source {source.path} is not a local file, directory or glob, and streaming it as a Hugging Face dataset "
            f"(split {source.hf_split}) failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            f"Offline machines (HF_DATASETS_OFFLINE=1) can only read local files."
        ) from None


def iter_documents(
    source: SourceConfig, encoding_errors: str = "strict", start: tuple = (0, 0)
) -> Iterator[Document]:
    """Stream a source's documents in a fixed order, starting at position (file index, row)."""
    files = resolve_files(source)
    if not files:
        yield from _iter_hub(source, start[1])
        return
    first_file, first_row = start
    for index in range(first_file, len(files)):
        yield from _iter_file(
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
