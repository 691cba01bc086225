"""The on-disk format of a prepared data.dir: file names, token shards, manifest.json, the validation split."""
