"""Where a prepared dataset lives: a local folder or any fsspec URL (s3://, gs://, az://, file://).

A `DataStore` is the dataset folder seen through the few operations the pipeline needs: one recursive
listing with sizes (so 100,000 shards are checked with one request, not one stat each), whole-file reads
and writes, ranged reads and uploads. Credentials and endpoints come from where each fsspec backend
normally finds them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws) or from
`data.storage_options`; none of them is ever written into our files. The one deletion, `remove`, is called only by
the checkpoint rotation, on files its own record lists.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from data_pipeline.errors import DataError

BACKENDS = {
    "s3": "s3fs (pip install 'slm-forge[s3]')",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL other than file:// (a plain path or file:// URL is a local folder)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://") :]) if text.startswith("file://") else Path(text)


def _options(protocol: str, storage_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """storage_options, plus AWS_ENDPOINT_URL for S3 (older botocore releases ignore that variable)."""
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in options:
        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault("endpoint_url", endpoint)
        options["client_kwargs"] = client_kwargs
    return options


class DataStore:
    """A dataset folder: `root` is a local Path, or (`fs`, `base`) an fsspec filesystem and the folder in it."""

    def __init__(self, location: str | os.PathLike, storage_options: Optional[Dict[str, Any]] = None):
        self.location = str(location).rstrip("/")
        self.remote = is_remote(location)
        self.root = None if self.remote else local_path(location)
        self.fs: Any = None
        self.base = ""
        if self.remote:
            protocol = self.location.split("://", 1)[0]
            try:
                import fsspec

                self.fs, self.base = fsspec.core.url_to_fs(
                    self.location, **_options(protocol, storage_options)
                )
            except ImportError as err:
                raise DataError(
                    f"data.dir {self.location} needs the fsspec backend for {protocol}:// ({err}); install "
                    f"{BACKENDS.get(protocol, 'the fsspec backend for it')}."
                ) from None
            except ValueError as err:
                raise DataError(f"data.dir {self.location} is not a URL fsspec can open ({err}).") from None
            self.base = self.base.rstrip("/")

    def __str__(self) -> str:
        return self.location

    def url(self, name: str) -> str:
        """Where a file of the dataset is, for messages (and local reads)."""
        return str(self.root / name) if self.root is not None else f"{self.location}/{name}"

    def _remote_path(self, name: str) -> str:
        return posixpath.join(self.base, name)

    def _failed(self, what: str, name: str, err: Exception) -> DataError:
        return DataError(
            f"Could not {what} {self.url(name)} ({type(err).__name__}: {err}); check the URL, the "
            f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or "
            f"data.storage_options) and that the store is reachable."
        )

    def listing(self) -> Dict[str, int]:
        """Size in bytes of every file under the folder, by path relative to it: one listing request."""
        if self.root is not None:
            sizes: Dict[str, int] = {}
            stack = [("", str(self.root))]
            while stack:
                prefix, folder = stack.pop()
                try:
                    entries = list(os.scandir(folder))
                except FileNotFoundError:
                    continue
                for entry in entries:
                    if entry.is_dir():
                        stack.append((prefix + entry.name + "/", entry.path))
                    elif entry.is_file():
                        sizes[prefix + entry.name] = entry.stat().st_size
            return sizes
        try:
            found = self.fs.find(self.base, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as err:  # noqa: BLE001 - backends raise their own errors; ours names the URL
            raise self._failed("list", "", err) from None
        start = len(self.base) + 1
        return {
            path[start:]: int(info.get("size") or 0)
            for path, info in found.items()
            if info.get("type") != "directory" and path.startswith(self.base + "/")
        }

    def exists(self, name: str) -> bool:
        if self.root is not None:
            return (self.root / name).is_file()
        try:  # not fs.isfile: s3fs answers False when the store cannot be reached at all
            return self.fs.info(self._remote_path(name)).get("type") == "file"
        except FileNotFoundError:
            return False
        except Exception as err:  # noqa: BLE001
            raise self._failed("look up", name, err) from None

    def read_bytes(self, name: str) -> bytes:
        if self.root is not None:
            return (self.root / name).read_bytes()
        try:
            return self.fs.cat_file(self._remote_path(name))
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._failed("read", name, err) from None

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file: a ranged GET on an object store."""
        if self.root is not None:
            with open(self.root / name, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        try:
            return self.fs.cat_file(self._remote_path(name), start=start, end=end)
        except Exception as err:  # noqa: BLE001
            raise self._failed("read a range of", name, err) from None

    def download(self, name: str, target: Path) -> None:
        """Copy a file to a local path (the caller renames it into place)."""
        try:
            self.fs.get_file(self._remote_path(name), str(target))
        except Exception as err:  # noqa: BLE001
            raise self._failed("download", name, err) from None

    def download_listing(
        self, listing: Dict[str, int], folder: Path, error: Callable[[str], Exception] = DataError
    ) -> None:
        """Download each file of a listing (name relative to this folder -> size on the store) into `folder`,
        checking every size; a short download raises `error(message)` naming the URL."""
        for name, size in sorted(listing.items()):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download(name, target)
            got = target.stat().st_size
            if got != size:
                raise error(
                    f"Download of {self.url(name)} gave {got} bytes, not the {size} the store lists; try again."
                )

    def upload(self, source: Path, name: str) -> None:
        """Put a local file at `name`. An object store makes an object visible only once it is complete."""
        try:
            self.fs.put_file(str(source), self._remote_path(name))
        except Exception as err:  # noqa: BLE001
            raise self._failed("upload to", name, err) from None
        size = self.listing_size(name)
        if size != source.stat().st_size:
            raise DataError(
                f"Upload of {source} to {self.url(name)} left {size} bytes instead of "
                f"{source.stat().st_size}; run prepare again to resume."
            )

    def remove(self, names: List[str]) -> None:
        """Delete these files (missing ones are skipped): only for files of ours that a record lists."""
        if not names:
            return
        if self.root is not None:
            for name in names:
                (self.root / name).unlink(missing_ok=True)
            return
        paths = [self._remote_path(name) for name in names]
        try:
            present = [path for path in paths if self.fs.isfile(path)]
            if present:
                self.fs.rm(present)
        except Exception as err:  # noqa: BLE001
            raise self._failed("delete", names[0], err) from None

    def listing_size(self, name: str) -> Optional[int]:
        try:
            return int(self.fs.size(self._remote_path(name)))
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001
            raise self._failed("look up", name, err) from None
