"""A real S3 endpoint for tests: moto's S3 server on 127.0.0.1, in threads of this process.

    with running_s3_server() as server:          # or the fixtures below
        bucket = server.create_bucket()
        adapter = S3Adapter(bucket, endpoint_url=server.endpoint_url)
        server.stop()                            # connections are refused from now on
        server.start()                           # same port, same buckets and objects

It serves moto's own WSGI app (the one ``moto.server.ThreadedMotoServer`` serves) from
a werkzeug server of ours, because ``ThreadedMotoServer.stop()`` neither closes the
listening socket (new connections then hang instead of being refused) nor ends
keep-alive connections (pooled clients would still be served). ``stop()`` here does
both, so the endpoint looks down the way a dead host looks down. moto keeps its
state in this process, so a restart finds every bucket as it was.

Fixtures (import them with ``from tests.s3_server import ...  # noqa: F401``):
``s3_server`` (one server per session) and ``s3_bucket`` (a fresh bucket on it, with
fake AWS credentials and region in the environment).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

HOST = "127.0.0.1"
REGION = "us-east-1"
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class _TrackingServer(ThreadedWSGIServer):
    """A werkzeug server that knows its open connections, so ``stop`` can cut them."""

    def __init__(self, port: int, app: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(HOST, port, app, handler=_QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already gone
                connection.shutdown(socket.SHUT_RDWR)


class S3TestServer:
    """moto's S3 on ``HOST``; ``port`` 0 picks a free one (kept across restarts)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server: _TrackingServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        server = _TrackingServer(self.port, self._app)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="moto-s3", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: close the listening socket and cut every open connection."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        server.cut_connections()
        thread.join()

    def client(self) -> Any:
        """A plain boto3 client for this server (explicit fake credentials)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION, **FAKE_CREDENTIALS)

    def create_bucket(self, name: str | None = None) -> str:
        bucket = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def object_names(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name in ``bucket`` under ``prefix`` (all pages)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextmanager
def running_s3_server(port: int = 0) -> Iterator[S3TestServer]:
    server = S3TestServer(port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def use_fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the AWS credential chain at fake keys and a region, and away from this
    machine's own config, profiles and instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class S3Bucket:
    server: S3TestServer
    bucket: str

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3TestServer]:
    with running_s3_server() as server:
        yield server


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    use_fake_credentials(monkeypatch)
    return S3Bucket(s3_server, s3_server.create_bucket())
