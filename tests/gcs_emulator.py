"""A GCS JSON API server on 127.0.0.1 for tests: PyPI's gcp-storage-emulator, in a thread.

The emulator ignores generation preconditions, which the workdir lock and the
append-by-compose writer rely on, so `Emulator` enforces `ifGenerationMatch` the way
GCS documents it (HTTP 412 when the live generation differs; 0 means "absent") before
the emulator sees a request, adds the x-goog-generation header GCS sends with each
download (tensorstore rejects a read without it), and logs every request for tests. The server
handles one request at a time, so check-then-write is atomic, as on GCS.

Clients find it through STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (tensorstore, hence Orbax); tensorstore also needs
GOOGLE_AUTH_TOKEN_FOR_TESTING so that it sends a fixed token instead of looking for
credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import socketserver
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict
    body_bytes: int


def _target(path: str, query: dict) -> tuple[str, str] | None:
    """(bucket, object) that a request writes or deletes, if it names one."""
    parts = path.split("/")
    # /upload/storage/v1/b/B/o?name=K   (uploads name the object in the query)
    if "upload" in parts and parts[-1] == "o" and "name" in query:
        return parts[parts.index("b") + 1], query["name"][0]
    # /storage/v1/b/B/o/K[/compose]
    if "b" in parts and "o" in parts:
        bucket = parts[parts.index("b") + 1]
        key = "/".join(parts[parts.index("o") + 1 :])
        if key.endswith("/compose"):
            key = key[: -len("/compose")]
        if key:
            return bucket, unquote(key)
    return None


_original_handle = emulator_server.Router.handle
_emulators: dict[int, Emulator] = {}


def _handle(router, method):
    handler = router._request_handler
    port = handler.server.server_address[1]
    emu = _emulators.get(port)
    if emu is None:
        return _original_handle(router, method)
    url = urlsplit(handler.path)
    query = parse_qs(url.query)
    length = int(handler.headers.get("Content-Length") or 0)
    request = Request(method, url.path, query, length)
    emu.requests.append(request)
    if emu.on_request is not None:
        emu.on_request(request)
    want = query.get("ifGenerationMatch", [None])[0]
    target = _target(url.path, query)
    live = "0"
    if target is not None:
        with contextlib.suppress(NotFound):
            live = str(emu.server._storage.get_file_obj(*target)["generation"])
    handler.gopher_generation = live  # for the x-goog-generation header of a download
    if want is not None and target is not None and live != str(want):
        if length:
            handler.rfile.read(length)  # drain the body so the client sees our reply
        body = json.dumps({"error": {"code": 412, "message": "Precondition Failed"}})
        handler.send_response(HTTPStatus.PRECONDITION_FAILED)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body.encode())
        return None
    return _original_handle(router, method)


emulator_server.Router.handle = _handle
_original_write_file = emulator_server.Response.write_file


def _write_file(response, content, content_type="application/octet-stream"):
    # GCS names the version it served; tensorstore (Orbax) needs it to read-modify-write.
    generation = getattr(response._handler, "gopher_generation", "0")
    if generation != "0":
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = "1"
    _original_write_file(response, content, content_type)


emulator_server.Response.write_file = _write_file


class Emulator:
    """Start with `start()`; `url` is http://127.0.0.1:PORT; `env()` the variables to set."""

    def __init__(self, bucket: str = "bucket"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Request] = []
        # Called with each request before it is served (a test may kill a client there).
        self.on_request: Callable[[Request], None] | None = None
        self.server = emulator_server.create_server(
            "127.0.0.1", self.port, in_memory=True, default_bucket=bucket
        )

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self) -> Emulator:
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        _emulators[self.port] = self
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
        _emulators.pop(self.port, None)


# Clients that hang up early (tensorstore after a HEAD-like read) make the stdlib
# server print a traceback per connection; they are not errors of the code under test.
_original_handle_error = socketserver.BaseServer.handle_error


def _handle_error(self, request, client_address):
    if self.server_address[1] not in _emulators:
        _original_handle_error(self, request, client_address)


socketserver.BaseServer.handle_error = _handle_error
