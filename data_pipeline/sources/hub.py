"""A source whose path is not local: a Hugging Face dataset name, streamed with
`load_dataset(name, split=hf_split, streaming=True)` (needs a machine that is online, so the test suite
cannot exercise it)."""

from __future__ import annotations

from typing import Iterator

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources.base import Document, check_document_size


def hub_documents(source: SourceConfig, start_row: int) -> Iterator[Document]:
    """The dataset's non-empty documents from row `start_row` on (file index 0)."""
    import datasets  # heavy, and only a Hub source needs it

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
                check_document_size(text, f"Hugging Face dataset {source.path} row {row}")
                yield Document(0, row, text)
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"Source {source.path} is not a local file, directory or glob, and streaming it as a Hugging Face dataset "
            f"(split {source.hf_split}) failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            f"Offline machines (HF_DATASETS_OFFLINE=1) can only read local files."
        ) from None
