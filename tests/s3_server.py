"""A real S3 server for the tests: moto's, in this process, on a free port of 127.0.0.1.

:func:`shared_server` starts one per test process (importing moto costs a second or two);
the ``s3_server`` fixture hands it out and points the standard AWS environment variables
at it for the session. Each test makes its own bucket (:meth:`S3Server.new_bucket`).

Faults are injected where a real deployment gets them, on the wire:

* :meth:`S3Server.stop` closes the listening socket and resets every open connection
  (clients see "connection refused" and "connection reset"); :meth:`S3Server.start`
  serves again on the same port, with the same objects (moto keeps them in memory).
* :attr:`S3Server.hook` sees each request (method, path) before moto does; returning an
  HTTP status answers with that S3 error instead (e.g. 503 SlowDown).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import Callable, Optional

import pytest

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
_ERROR_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}


class S3Server:
    """moto's S3 behind a WSGI wrapper that can fail requests; stoppable and restartable."""

    def __init__(self) -> None:
        self.port = 0
        self.hook: Optional[Callable[[str, str], Optional[int]]] = None
        self.requests: list[tuple[str, str]] = []
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._connections: set = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self):
        from moto.server import DomainDispatcherApplication, create_backend_app

        inner = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            with self._lock:
                self.requests.append((method, path))
            hook = self.hook
            status = hook(method, path) if hook is not None else None
            if status:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                if length:
                    environ["wsgi.input"].read(length)      # keep the connection in step
                body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{_ERROR_CODES.get(status, 'Error')}"
                        f"</Code><Message>injected by the test</Message></Error>").encode()
                start_response(f"{status} Injected", [("Content-Type", "application/xml"),
                                                      ("Content-Length", str(len(body)))])
                return [body]
            return inner(environ, start_response)
        return app

    def start(self) -> None:
        from moto.server import MotoRequestHandler
        from werkzeug.serving import make_server

        server = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def log_request(self, *args, **kwargs) -> None:     # quiet
                pass

        self._server = make_server("127.0.0.1", self.port, self._app(), threaded=True, request_handler=Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones (keep-alive included)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assert self._thread is not None
        self._thread.join()
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"ckpt-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)


_shared: Optional[S3Server] = None
_shared_lock = threading.Lock()


def shared_server() -> S3Server:
    """This process's S3 server, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the test extra)")
            pytest.importorskip("tensorstore")
            server = S3Server()
            server.start()
            _shared = server
        elif not _shared.running:
            _shared.start()
        return _shared


@pytest.fixture(scope="session")
def s3_server():
    """The running S3 server, with AWS_* variables pointing at it for the session."""
    server = shared_server()
    env = dict(_ENV, AWS_ENDPOINT_URL_S3=server.endpoint)
    saved = {k: os.environ.get(k) for k in list(env) + ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"]}
    os.environ.update(env)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
