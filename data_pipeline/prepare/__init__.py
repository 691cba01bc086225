"""`slm prepare`: dispatch.py is the entry; local, parts and remote modes; common.py their shared helpers."""
