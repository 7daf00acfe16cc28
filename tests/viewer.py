"""The OHIF side of the browser test: where the pinned viewer lives, its configuration,
and one same-origin HTTP server in front of it and of Orthanc's DICOMweb.

OHIF's built ``index.html`` expects to live at ``/`` and its routes (``/viewer``) need an
``index.html`` fallback, which Orthanc's ServeFolders plugin lacks; a single origin also
spares CORS. So :class:`OhifServer` (a ``ThreadingHTTPServer``) serves ``dist/``, answers
``/app-config.js`` with :func:`app_config`, and forwards ``/dicom-web/…`` and ``/wado…`` to
Orthanc. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "OHIF_VERSION",
    "OhifServer",
    "app_config",
    "ohif_dist",
]

#: The pinned viewer (``make ohif`` unpacks it): 3.13 cannot render mammograms whose
#: VOILUTFunction is LINEAR (see docs/viewing.md).
OHIF_VERSION = "3.12.10"
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
#: Headless Debian Chromium: WebGL 2 through SwiftShader, nothing fetched from outside.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


def ohif_dist() -> Path:
    """The unpacked ``dist/`` of the pinned OHIF (``$OHIF_DIST`` overrides the cache)."""
    override = os.environ.get("OHIF_DIST")
    if override:
        return Path(override)
    return REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"


def app_config() -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on this origin's ``/dicom-web``.

    The data source settings are the ones Orthanc's DICOMweb plugin needs (no
    ``includefield`` in QIDO, unquoted multipart types, bulk data by URI); the
    investigational-use dialog and the CPU / cross-origin warnings are off.
    """
    config = {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc",
                    "name": "orthanc",
                    "wadoUriRoot": "__ORIGIN__/wado",
                    "qidoRoot": "__ORIGIN__/dicom-web",
                    "wadoRoot": "__ORIGIN__/dicom-web",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    text = json.dumps(config, indent=2).replace('"__ORIGIN__', 'window.location.origin + "')
    return f"window.config = {text};\n"


class _Handler(BaseHTTPRequestHandler):
    server: OhifServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, app_config().encode(), "application/javascript")
        else:
            self._static(path)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        target = (root / path.lstrip("/")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            # OHIF's client-side routes (/viewer, /segmentation, …) are index.html.
            target = root / "index.html"
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            ctype = "application/wasm"
        size = target.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with target.open("rb") as fh:
            shutil.copyfileobj(fh, self.wfile)

    def _proxy(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        try:
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            self._send(502, f"Orthanc: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OhifServer(ThreadingHTTPServer):
    """OHIF's ``dist/`` and Orthanc's DICOMweb on one loopback origin.

    Parameters
    ----------
    dist : Path
        The unpacked OHIF ``dist/`` folder.
    orthanc_port : int
        Orthanc's HTTP port (its DICOMweb plugin answers under ``/dicom-web``).
    """

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
