"""Where a prepared dataset lives (a local folder or an fsspec URL) and the local cache of a remote one."""
