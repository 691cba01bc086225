"""Checkpoints on an object store (checkpoint.dir an fsspec URL): staged on local disk, uploaded, completed last;
read back through a node-local copy that is verified exactly like a local checkpoint.

On the store, `URL/step_00000100/` holds the files of a local step folder. A save writes every rank's files
into a node-local staging folder (DeepSpeed needs a filesystem), each node's first rank hashes and uploads its
node's files, and rank 0 then uploads tokenizer.json, meta.json (every file's size and hash) and COMPLETE, in
that order, and rewrites `URL/latest`: a step folder without COMPLETE is never loaded, so a save killed
half-way leaves the previous checkpoint as the resume point. Rotation removes an old complete step folder
COMPLETE first, then only the files its meta.json lists (and meta.json): nothing we did not write.

Node-local folders, under data.cache_dir (node-local temp by default), one per URL:
  staging/tmp.step_X/   a save being written (DeepSpeed's checkpoint_dir is `staging`), removed after upload
  steps/step_X/         the local copy of one checkpoint: the last one saved here, or downloaded (written
                        beside it and renamed, reused only while its meta.json equals the store's); what every
                        load reads, after the usual size and hash verification (train.checkpoint.files)
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from common import faults
from common.atomic import atomic_write_text, replace_dir
from common.log import say
from data_pipeline.errors import DataError
from data_pipeline.storage.cache import dataset_cache_dir
from data_pipeline.storage.store import DataStore
from train.checkpoint.files import CheckpointDamaged, checkpoint_files, newest_intact, record_of
from train.checkpoint.layout import COMPLETE, LATEST, META, TMP_PREFIX, is_step_name, step_of
from train.errors import TrainError

STAGING = "staging"
"""The node-local folder a save is written to before its upload."""
COPIES = "steps"
"""The node-local folder holding the local copy of a checkpoint."""


def inside(name: str) -> bool:
    """Whether a file name from the store or a record stays inside its folder (no `..`, not absolute)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


class RemoteCheckpoints:
    """The checkpoint folder at a URL, with its node-local staging folder and copies."""

    def __init__(self, url: str, storage_options: Optional[Dict[str, Any]], cache_dir: Optional[str]):
        self.storage_options = storage_options
        try:
            self.store = DataStore(url, storage_options)
        except DataError as err:  # it names data.dir, the usual user of a DataStore
            raise TrainError(f"checkpoint folder {url}: {err}".replace("data.dir ", "")) from None
        self.url = self.store.location
        self.local = dataset_cache_dir(self.store, cache_dir)
        """This URL's node-local folder (the same path on every node)."""

    @property
    def staging(self) -> Path:
        return self.local / STAGING

    def copy_dir(self, tag: str) -> Path:
        return self.local / COPIES / tag

    def listing(self) -> Dict[str, int]:
        """Every file under the URL with its size, listed afresh (no cached listing)."""
        if self.store.fs is not None:
            self.store.fs.invalidate_cache()
        return self.store.listing()

    def complete_steps(self) -> List[str]:
        """The complete step folders on the store (those holding COMPLETE), oldest first: one listing."""
        names = {
            name.split("/", 1)[0]
            for name in self.listing()
            if name.count("/") == 1 and name.endswith("/" + COMPLETE)
        }
        return sorted((n for n in names if is_step_name(n)), key=lambda n: step_of(Path(n)))

    # --- saving --------------------------------------------------------------------------------------
    def open_step(self, tag: str) -> None:
        """Before a save of `tag` uploads anything: a complete folder of that step (a resumed run saving its
        step again) stops being complete first, and the pickles and meta.json of an earlier upload of it (a killed
        one, or another world size) are removed, since a load refuses a .pt file its record does not list (rank 0)."""
        prefix = tag + "/"
        present = [name for name in self.listing() if name.startswith(prefix)]
        if f"{tag}/{COMPLETE}" in present:
            self.store.remove([f"{tag}/{COMPLETE}"])
        self.store.remove(
            [n for n in present if n.count("/") == 1 and (n.endswith(".pt") or n == prefix + META)]
        )

    def upload_files(self, tmp_dir: Path, tag: str) -> Dict[str, Any]:
        """Hash and upload every file of this node's part of a save; returns their record (train.checkpoint.files)."""
        record = record_of(tmp_dir, checkpoint_files(tmp_dir))
        names = sorted(record["files"])
        for done, name in enumerate(names, start=1):
            self.store.upload(tmp_dir / name, f"{tag}/{name}")
            if done == 1 and faults.hold_upload(step_of(Path(tag))):
                say(
                    f"fault injection ({faults.HOLD_UPLOAD_AT_STEP}): holding the upload of {self.url}/{tag} "
                    f"after 1 of its {len(names)} files"
                )
                faults.pause_in_save(600)
        return record

    def publish(self, tmp_dir: Path, tag: str) -> Path:
        """Upload meta.json, then COMPLETE, then `latest` (rank 0, after every node uploaded its files); the
        staging folder becomes the local copy of this checkpoint, which is returned."""
        self.store.upload(tmp_dir / META, f"{tag}/{META}")
        atomic_write_text(tmp_dir / COMPLETE, f"{tag}\n")
        self.store.upload(tmp_dir / COMPLETE, f"{tag}/{COMPLETE}")
        self._upload_text(LATEST, f"{tag}\n")
        copy = self.copy_dir(tag)
        copy.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp_dir, copy)
        self._drop_other_copies(tag)
        return copy

    def _upload_text(self, name: str, text: str) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.local)
        path = Path(tmp)
        try:
            with open(fd, "w", encoding="utf-8") as f:
                f.write(text)
            self.store.upload(path, name)
        finally:
            path.unlink(missing_ok=True)

    def prune(self, keep: int) -> List[str]:
        """Remove all but the newest `keep` complete step folders on the store: COMPLETE first, then the files
        their meta.json lists, then meta.json. Returns the removed tags."""
        removed = []
        for tag in self.complete_steps()[:-keep] if keep > 0 else []:
            try:
                recorded = list(json.loads(self.store.read_bytes(f"{tag}/{META}")).get("files") or {})
            except (OSError, ValueError, AttributeError, DataError):
                say(f"note: {self.url}/{tag} has no readable {META}; left in place by the rotation")
                continue
            self.store.remove([f"{tag}/{COMPLETE}"])
            self.store.remove(
                [f"{tag}/{name}" for name in recorded if not name.startswith("..")] + [f"{tag}/{META}"]
            )
            removed.append(tag)
        return removed

    # --- reading -------------------------------------------------------------------------------------
    def fetch(self, tag: str) -> Path:
        """The local copy of the complete checkpoint `tag`: reused when its meta.json equals the store's, else
        downloaded whole (beside it, then renamed). Not verified here: every load verifies it. One process of a
        node at a time (the ranks of `slm eval` each ask): the others then find the copy made."""
        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.local / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._fetch(tag)

    def _fetch(self, tag: str) -> Path:
        try:
            meta = self.store.read_bytes(f"{tag}/{META}")
        except FileNotFoundError:
            raise CheckpointDamaged(
                f"Checkpoint {self.url}/{tag} has {COMPLETE} but no {META}; expected the record slm train writes."
            ) from None
        copy = self.copy_dir(tag)
        if (copy / COMPLETE).is_file() and (copy / META).is_file() and (copy / META).read_bytes() == meta:
            return copy
        step_store = DataStore(f"{self.url}/{tag}", self.storage_options)
        listing = step_store.listing()
        outside = sorted(name for name in listing if not inside(name))
        if outside:
            raise CheckpointDamaged(
                f"Checkpoint {self.url}/{tag} holds {outside[0]!r}, a name that leads outside its folder; "
                "slm train never writes one."
            )
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", suffix=".tmp", dir=copy.parent))
        say(f"downloading checkpoint {self.url}/{tag} to {copy}")
        try:
            wanted = {
                name: size
                for name, size in listing.items()
                if name not in (META, COMPLETE) and not name.startswith(("universal/", TMP_PREFIX))
            }
            step_store.download_listing(wanted, tmp, CheckpointDamaged)
            (tmp / META).write_bytes(meta)
            atomic_write_text(tmp / COMPLETE, f"{tag}\n")
            replace_dir(tmp, copy)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._drop_other_copies(tag)
        return copy

    def _drop_other_copies(self, tag: str) -> None:
        """Keep one local copy per URL: other step folders of ours under `steps/` are removed."""
        for other in (self.local / COPIES).iterdir():
            if other.is_dir() and is_step_name(other.name) and other.name != tag:
                shutil.rmtree(other, ignore_errors=True)

    def newest_intact(self, hashes: bool, at_most: Optional[int] = None) -> Optional[Path]:
        """The local copy of the newest complete checkpoint (at step <= at_most) whose files match its record;
        a damaged one is reported, naming the file, and the previous one is fetched instead."""

        def candidates() -> Iterator[Path]:
            for tag in reversed(self.complete_steps()):
                if at_most is None or step_of(Path(tag)) <= at_most:
                    try:
                        yield self.fetch(tag)
                    except CheckpointDamaged as err:
                        say(f"warning: {err} Falling back to the previous complete checkpoint.")

        return newest_intact(candidates(), hashes, lambda line: say(f"{line} (from {self.url})"))


def split_step_url(url: str) -> tuple:
    """(checkpoint folder URL, step tag or None) of a URL naming a checkpoint folder or one step folder in it."""
    url = url.rstrip("/")
    parent, _, last = url.rpartition("/")
    return (parent, last) if is_step_name(last) else (url, None)


def fetch_checkpoint_url(
    url: str, storage_options: Optional[Dict[str, Any]], cache_dir: Optional[str], hashes: bool = True
) -> Optional[Path]:
    """The verified local copy of the checkpoint a URL names: a step folder, or the newest intact complete one of a
    checkpoint folder (falling back past a damaged one). None when the URL holds no complete checkpoint."""
    folder, tag = split_step_url(url)
    remote = RemoteCheckpoints(folder, storage_options, cache_dir)
    if tag is None:
        return remote.newest_intact(hashes)
    if tag not in remote.complete_steps():
        raise TrainError(
            f"{url} is not a complete checkpoint (no {COMPLETE} there); expected a step folder written by slm train "
            f"(the complete ones under {folder}: {', '.join(remote.complete_steps()) or 'none'})."
        )
    return remote.fetch(tag)


def holds_checkpoints(url: str, storage_options: Optional[Dict[str, Any]]) -> bool:
    """Whether a URL is a checkpoint folder or a step folder of one (it holds a COMPLETE of ours)."""
    folder, tag = split_step_url(url)
    if tag is not None:
        return True
    return bool(RemoteCheckpoints(folder, storage_options, None).complete_steps())
