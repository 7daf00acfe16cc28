"""Orthanc (the Debian package) as the PACS of the end-to-end benchmarks.

One process on free loopback ports with its own configuration file and log in a
folder; ``e2e.py`` and ``soak.py`` add what each one watches (arrival times, a
receipt log). The suite's own wrapper is ``tests/helpers.py``'s ``OrthancServer``,
which also loads the DICOMweb plugin.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ORTHANC = Path("/usr/sbin/Orthanc")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancProcess:
    """Orthanc storing into ``folder / "db"``; start, stop (restartable), REST ``get``.

    Parameters
    ----------
    folder : pathlib.Path
        Configuration, log and storage; kept across restarts.
    name : str
        Orthanc's ``Name``.
    config : mapping
        Further configuration keys (they override the defaults here).
    timeout : float
        Seconds of REST calls.
    """

    ae_title = "ORTHANC"

    def __init__(
        self,
        folder: Path,
        *,
        name: str,
        config: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.folder, self.name, self.timeout = folder, name, timeout
        self.extra = dict(config or {})
        self.port, self.http = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start Orthanc (no-op when running) and wait until its REST API answers."""
        if self.running:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.name,
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            **self.extra,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [str(ORTHANC), str(self.folder / "orthanc.json")], stdout=log, stderr=log
        )
        for _ in range(600):
            try:
                self.get("/system")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited at start; see {log.name}") from None
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start; see {log.name}")

    def stop(self) -> None:
        """Terminate (kill after 30 s); the storage stays for a later :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        """``GET`` a REST path, decoded JSON."""
        url = f"http://127.0.0.1:{self.http}{path}"
        with urllib.request.urlopen(url, timeout=self.timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes) -> Any:
        """``POST`` ``body`` to a REST path, decoded JSON."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}", data=body, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())
