"""A real S3 API server on loopback for the object-storage tests.

It is moto's ``ThreadedMotoServer``: an *emulator of the S3 API* (not AWS), spoken to over HTTP by
the real clients (s3fs/botocore, boto3). ``FaultProxy`` sits between a client and the server and
can fail a share of requests with 503 or drop the connection (transient faults the pipeline must
retry), or strip ``If-None-Match`` (a store without conditional writes).
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import socketserver
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    env: dict = field(default_factory=dict)
    stop: object = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"})

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


def env_for(endpoint: str) -> dict:
    """The standard AWS environment that points every client at ``endpoint``."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@contextmanager
def moto_server(host: str = "127.0.0.1", port: int = 0):
    """moto's threaded server in this process (an S3 API emulator), its endpoint and environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    h, p = server.get_host_and_port()
    endpoint = f"http://{h}:{p}"
    try:
        yield S3Server(endpoint, env_for(endpoint))
    finally:
        server.stop()


@contextmanager
def moto_process(host: str, port: int, netns: str | None = None):
    """moto's server as a process of its own (optionally inside a network namespace), for tests whose
    clients live in other processes or namespaces."""
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 30
        probe = ["ip", "netns", "exec", netns] if netns else []
        while time.monotonic() < deadline:
            ok = subprocess.run([*probe, sys.executable, "-c", f"import urllib.request; urllib.request.urlopen("
                                 f"'{endpoint}/moto-api/', timeout=2)"], capture_output=True).returncode == 0
            if ok:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"moto server at {endpoint} did not come up")
        yield S3Server(endpoint, env_for(endpoint))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class FaultProxy:
    """An HTTP proxy in front of ``upstream`` (``http://host:port``). ``fail_share``: that share of
    requests answered 503 SlowDown or cut off (half each), after the first ``grace`` requests;
    ``strip_conditional``: drop If-None-Match before forwarding. Counts what it did."""

    def __init__(self, upstream: str, fail_share: float = 0.0, strip_conditional: bool = False, seed: int = 0,
                 grace: int = 0):
        self.upstream = upstream.removeprefix("http://")
        self.fail_share, self.strip_conditional, self.grace = fail_share, strip_conditional, grace
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.failed_503 = self.dropped = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.requests <= self.grace or self.rng.random() >= self.fail_share:
                return None
            kind = "503" if self.rng.random() < 0.5 else "drop"
            if kind == "503":
                self.failed_503 += 1
            else:
                self.dropped += 1
            return kind

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._fault()
        if fault == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if fault == "503":
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                       b'<Message>Please reduce your request rate.</Message></Error>')
            h.send_response(503)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        if self.strip_conditional:
            headers = {k: v for k, v in headers.items() if k.lower() != "if-none-match"}
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(h.command, h.path, body=body or None, headers={**headers, "Host": self.upstream})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(k, v)
        h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def set_env(env: dict) -> dict:
    """Put ``env`` into os.environ; returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
