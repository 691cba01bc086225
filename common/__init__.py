"""The bottom layer: generic helpers every package may import (and that import no package of ours).

`common.atomic` writes files and folders atomically; `common.files` holds sha256 and fsync of folders;
`common.faults` reads the test-only fault-injection hooks. Imports flow launch -> train -> data_pipeline -> model,
and every one of them may import `common`.
"""
