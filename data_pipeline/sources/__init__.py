"""Raw documents from local files (one reader per file type) or a Hugging Face dataset."""
