"""The names in a prepared data.dir: its files, the prepare's work files, and the splits.

tokenizer.json                  the tokenizer (its sha256 is its identity)
<source>-<split>-NNNNN.bin      the token shards of each (source, split) stream, in order
manifest.json                   the table of contents, written last: its presence marks a complete prepare
.prepare/                       an unfinished prepare: state.json (its last commit), shards.jsonl (sealed
                                shards), the growing `.partial` shards
.prepare.lock                   held by the prepare writing the folder
.parts/K-of-N/                  the token streams of `slm prepare --part K/N`, DONE.json last
.prepare-origin.json            (a URL data.dir) the config a prepare into it comes from
"""

from __future__ import annotations

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")

WORK_DIR = ".prepare"
STATE = "state.json"
JOURNAL = "shards.jsonl"
LOCK = ".prepare.lock"
PARTS = ".parts"
DONE = "DONE.json"
ORIGIN = ".prepare-origin.json"


def shard_file_name(source: str, split: str, index: int) -> str:
    return f"{source}-{split}-{index:05d}.bin"
