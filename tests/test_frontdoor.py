"""The front door alone: a real nginx with the kit's configuration in front of a stand-in SuperLink
(a TLS server on the loopback that records every request reaching it).

Only ``POST /v1/fleet/<method>`` passes, its headers (Flower's signed SuperNode identity: public
key, signature, timestamp) and a body of several MiB unchanged, and the SuperLink's answer comes
back as it was (a 401 included); every other path, method or disguise of one (dot segments,
escapes, doubled slashes, another case, a query) gets 403 from nginx and never reaches the
SuperLink; a SuperLink whose certificate the deployment's CA did not sign gets nothing (502).
The whole deployment through the front door is ``tests/test_deployment.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deploy.localhost import ROOT, Machines, free_ports, start_front_door

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, localhost ports")

FLEET_HEADERS = {  # what a SuperNode's interceptors add (flwr/supernode/node_auth_http_interceptor.py)
    "content-type": "application/protobuf",
    "flwr-public-key": "BAsomeBase64PublicKey+/=",
    "flwr-signature": "MGUCMQsomeBase64Signature+/=",
    "flwr-timestamp": "2026-12-03T19:00:00.123456+00:00",
    "flwr-package-name": "flwr",
    "flwr-package-version": "1.41.0",
    "flwr-component-name": "SuperNode",
}
REFUSED = [
    ("POST", "/v1/control/start-run"),  # flwr run
    ("POST", "/v1/control/list-runs"),  # flwr ls
    ("POST", "/v1/control/register-supernode"),
    ("POST", "/v1/runtime/get-nodes"),  # the ServerApp's API
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/v1/fleet/pull-messages"),  # the Fleet API is POST only
    ("PUT", "/v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleetx/pull-messages"),
    ("POST", "/V1/FLEET/pull-messages"),
    ("POST", "/v1/fleet/pull-messages?x=1"),
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ("POST", "/v1/fleet/..%2fcontrol/start-run"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", "/v1/fleet/%70ull-messages"),
    ("POST", "//v1/control/start-run"),
    ("POST", "/v1/control/../fleet/pull-messages"),
]


class StandIn(BaseHTTPRequestHandler):
    """A SuperLink stand-in: records (method, raw path, headers, body digest); answers 200 with
    the body's sha256 and a header of its own, or 401 for activate-node (an unregistered key)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves nginx's upstream connections
    seen: list[tuple[str, str, dict[str, str], str]]

    def do_any(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        digest = hashlib.sha256(body).hexdigest()
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, digest))
        status = 401 if self.path.endswith("/activate-node") else 200
        answer = digest.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(answer)))
        self.send_header("flwr-version-incompatibility", "none")
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_any

    def log_message(self, *args: object) -> None:
        pass


def kit(folder: Path, *args: str) -> Path:
    made = subprocess.run(
        [sys.executable, "-m", "deploy.kit", str(folder), "--host", "localhost", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture
def door(tmp_path, nginx):
    """nginx on a free port in front of the stand-in; yields (a TLS connection maker, the stand-in's log)."""

    def serve(certs: Path, port: int) -> tuple[ThreadingHTTPServer, list]:
        seen: list = []
        server = ThreadingHTTPServer(("127.0.0.1", port), type("Seen", (StandIn,), {"seen": seen}))
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, seen

    def start(upstream_certs: str = "certs"):
        public, link = free_ports(2)
        certs = kit(tmp_path / "certs", "--front-door", "--port", str(public), "--superlink-port", str(link))
        other = certs if upstream_certs == "certs" else kit(tmp_path / upstream_certs)
        server, seen = serve(other, link)
        servers.append(server)
        start_front_door(machines, nginx, certs, public, os.environ)
        client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        return (lambda: http.client.HTTPSConnection("localhost", public, context=client, timeout=30)), seen

    servers: list[ThreadingHTTPServer] = []
    with Machines(tmp_path) as machines:
        yield start
    for server in servers:
        server.shutdown()


def request(connect, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = connect()
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # the path as given, undecoded
        for key, value in {**(headers or {}), "content-length": str(len(body))}.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read()
    finally:
        conn.close()


def test_only_the_fleet_api_passes_unchanged(door):
    connect, seen = door()
    body = os.urandom(6 * 1024 * 1024 + 17)  # more than one 5 MiB weight chunk
    status, headers, answer = request(connect, "POST", "/v1/fleet/push-object", body, FLEET_HEADERS)
    assert status == 200 and answer == hashlib.sha256(body).hexdigest().encode()
    assert headers.get("flwr-version-incompatibility") == "none"  # the SuperLink's own headers come back
    ((method, path, got, digest),) = seen
    assert (method, path, digest) == ("POST", "/v1/fleet/push-object", answer.decode())
    assert {k: got.get(k) for k in FLEET_HEADERS} == FLEET_HEADERS  # the signed identity, byte for byte

    status, _, answer = request(connect, "POST", "/v1/fleet/activate-node", b"x", FLEET_HEADERS)
    assert status == 401 and len(seen) == 2  # the SuperLink's refusal reaches the node as it was

    for method, path in REFUSED:
        status, _, _ = request(connect, method, path, b"{}", FLEET_HEADERS)
        assert status == 403, (method, path, status)
    assert len(seen) == 2, seen[2:]  # none of them reached the SuperLink


def test_a_superlink_the_ca_did_not_sign_gets_nothing(door):
    connect, seen = door(upstream_certs="stranger")
    status, _, _ = request(connect, "POST", "/v1/fleet/pull-messages", b"x", FLEET_HEADERS)
    assert status == 502 and seen == []
