"""HTTP/2 through the gateway end to end: a real ``twistd -n txgateway``, real HTTP/2 clients.

curl (``--http2-prior-knowledge`` on the cleartext port, ``--http2`` with
ALPN over TLS) and h2load talk to the gateway; the upstreams are the
HTTP/1.1 test servers of :mod:`tests.integration.harness`, so each request
also crosses from HTTP/2 to HTTP/1.1.  The TLS certificate is made by the
test (cryptography), self-signed for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import shutil
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import TestCase

from tests.integration.harness import (
    CURL,
    LOCALHOST,
    PATTERN_PERIOD,
    EchoUpstream,
    FixedResponse,
    FixedUpstream,
    GatewayProcess,
    GatewayTestCase,
    MiB,
    SourceUpstream,
    StalledUpstream,
    free_port,
    pattern_bytes,
    pattern_sha256,
    run,
)

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
CURL_BASE = ("-sS", "--noproxy", "*")


def upstream(ports: dict[str, int], name: str) -> dict[str, Any]:
    return {"servers": [{"address": f"{LOCALHOST}:{ports[name]}"}], "timeouts": {"connect": 2, "request": 10}}


def route(name: str, path: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"path": path}, "upstream": target, **extra}


def header_values(seen: list[list[str]], name: str) -> list[str]:
    return [value for key, value in seen if key.lower() == name]


async def curl_version(url: str, *args: str) -> tuple[str, int, str]:
    """(HTTP version curl used, status, stderr) for one request whose body is dropped."""
    out, err, code = await run(
        CURL, *CURL_BASE, "--max-time", "10", "-o", os.devnull, "-w", "%{http_version} %{http_code}", *args, url
    )
    version, _, status = out.decode().partition(" ")
    return version, int(status or 0), f"exit {code}: {err.decode(errors='replace')}"


def write_pattern(path: str, size: int) -> None:
    with open(path, "wb") as f:
        offset = 0
        while offset < size:
            piece = min(PATTERN_PERIOD // 2, size - offset)
            f.write(pattern_bytes(offset, piece))
            offset += piece


class HTTP2Tests(GatewayTestCase):
    """h2c with prior knowledge on the gateway's one port, next to HTTP/1.1."""

    upstreams = {
        "echo": EchoUpstream,
        "fixed": lambda: FixedUpstream(
            {
                "/fixed/headers": FixedResponse(
                    200,
                    [
                        ("Content-Type", "text/plain"),
                        ("Set-Cookie", "a=1"),
                        ("Set-Cookie", "b=2"),
                        ("Connection", "keep-alive, x-private"),
                        ("X-Private", "secret"),
                        ("Keep-Alive", "timeout=5"),
                        ("X-Upstream", "yes"),
                    ],
                    b"fixed body\n",
                )
            }
        ),
        "source": SourceUpstream,
        "stalled": StalledUpstream,
    }

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "server": {"limits": {"max_body_bytes": "1MiB"}},
            "upstreams": {name: upstream(ports, name) for name in ports},
            "routes": [
                route("echo", "/echo/*", "echo"),
                route("upload", "/upload/*", "echo", max_body_bytes="64MiB"),
                route("fixed", "/fixed/*", "fixed"),
                route("download", "/download/*", "source"),
                route("stalled", "/stalled/*", "stalled", max_body_bytes="1GiB"),
            ],
        }

    async def test_get_with_prior_knowledge(self) -> None:
        result = await self.curl("/echo/a?b=1", "--http2-prior-knowledge", "-H", "X-Test: 1")
        self.assertEqual(result.status, 200, result.stderr)
        self.assertEqual(result.header(b"content-type"), b"application/json")
        self.assertIn(b"txgateway", result.header(b"via") or b"")
        self.assertIsNotNone(result.header(b"x-request-id"))
        seen = result.json()
        self.assertEqual((seen["method"], seen["path"], seen["query"]), ("GET", "/echo/a", "b=1"))
        # The HTTP/1.1 upstream got a Host (from :authority) and the client's headers.
        self.assertEqual(header_values(seen["headers"], "host"), [f"{LOCALHOST}:{self.port}"])
        self.assertEqual(header_values(seen["headers"], "x-test"), ["1"])
        self.assertEqual(seen["version"], "1.1")
        version, status, err = await curl_version(self.url("/echo/v"), "--http2-prior-knowledge")
        self.assertEqual((version, status), ("2", 200), err)

    async def test_http1_and_http2_on_one_port(self) -> None:
        for args, expected in ((("--http1.1",), "1.1"), (("--http2-prior-knowledge",), "2")):
            version, status, err = await curl_version(self.url("/echo/both"), *args)
            self.assertEqual((version, status), (expected, 200), err)
        # POST over HTTP/1.1 starts with 'P' too: not mistaken for the preface.
        result = await self.curl("/echo/post", "--http1.1", "-d", "hello")
        self.assertEqual(result.status, 200)
        self.assertEqual(result.json()["body_bytes"], 5)

    async def test_response_headers(self) -> None:
        result = await self.curl("/fixed/headers", "--http2-prior-knowledge")
        # nghttp2 in curl refuses connection-specific fields: getting here proves they were dropped.
        self.assertEqual(result.status, 200, result.stderr)
        self.assertEqual(result.body, b"fixed body\n")
        self.assertEqual(result.header_values(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(result.header(b"x-upstream"), b"yes")
        self.assertEqual(result.header(b"content-length"), b"11")
        for name in (b"connection", b"keep-alive", b"x-private"):
            self.assertIsNone(result.header(name), name)

    async def test_gateway_error_over_http2(self) -> None:
        result = await self.curl("/nowhere", "--http2-prior-knowledge")
        self.assertEqual(result.status, 404)
        self.assertEqual(result.json()["error"], "not_found")

    async def test_streamed_download(self) -> None:
        source = self.servers["source"]
        assert isinstance(source, SourceUpstream)
        size = 8 * MiB + 7
        for query in ("", "?chunked=1"):
            result = await self.curl(f"/download/{size}{query}", "--http2-prior-knowledge", timeout=30)
            self.assertEqual(result.status, 200, result.stderr)
            self.assertEqual(len(result.body), size)
            self.assertEqual(hashlib.sha256(result.body).hexdigest(), pattern_sha256(size))

    async def test_streamed_upload(self) -> None:
        payload = self.mktemp()
        size = 8 * MiB + 5
        write_pattern(payload, size)
        result = await self.curl("/upload/big", "--http2-prior-knowledge", "-T", payload, timeout=30)
        self.assertEqual(result.status, 200, result.body[:300])
        seen = result.json()
        self.assertEqual(seen["body_bytes"], size)
        self.assertEqual(seen["body_sha256"], pattern_sha256(size))

    async def test_upload_over_route_limit(self) -> None:
        payload = self.mktemp()
        write_pattern(payload, 2 * MiB)
        result = await self.curl("/echo/too-big", "--http2-prior-knowledge", "-T", payload)
        self.assertEqual(result.status, 413, result.stderr)
        self.assertEqual(result.json()["error"], "payload_too_large")

    async def test_slow_upstream_closes_the_client_window(self) -> None:
        """An upstream that stops reading stops the HTTP/2 upload: the windows close, nothing piles up."""
        payload = self.mktemp()
        with open(payload, "wb") as f:
            f.truncate(256 * MiB)
        memory = self.gateway.memory()["VmRSS"]
        out, err, code = await run(
            CURL, *CURL_BASE, "--http2-prior-knowledge", "--max-time", "3", "-o", os.devnull,
            "-w", "%{size_upload}", "-T", payload, self.url("/stalled/upload"),
        )  # fmt: skip
        self.assertEqual(code, 28, err)  # still uploading when curl gave up
        self.assertLess(int(out), 32 * MiB, "the client could upload far more than windows and socket buffers hold")
        self.assertLess(self.gateway.memory()["VmRSS"] - memory, 16 * MiB)

    async def test_h2load(self) -> None:
        out, err, code = await run(H2LOAD, "-n", "2000", "-c", "4", "-m", "10", self.url("/echo/load"))
        report = out.decode(errors="replace")
        self.assertEqual(code, 0, report + err.decode(errors="replace"))
        self.assertRegex(report, r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored")
        match = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", report)
        assert match is not None, report
        self.assertEqual(match.groups(), ("2000", "0", "0", "0"))


def self_signed(directory: str) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, written as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txgateway-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "tls.crt")
    key_path = os.path.join(directory, "tls.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


class TLSTests(TestCase):
    """The ``server.tls`` listener: ALPN h2 and http/1.1, ``https`` for the upstream."""

    timeout = 60

    async def test_alpn(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = self_signed(directory)
        echo = EchoUpstream()
        echo_port = echo.listen(free_port())
        self.addCleanup(echo.stop)
        tls_port = free_port()
        gateway = GatewayProcess(
            {
                "server": {"tls": {"listen_addr": f"{LOCALHOST}:{tls_port}", "cert": cert, "key": key}},
                "upstreams": {"echo": {"servers": [{"address": f"{LOCALHOST}:{echo_port}"}]}},
                "routes": [route("echo", "/echo/*", "echo")],
            }
        )
        await gateway.start()
        self.addCleanup(gateway.stop)
        url = f"https://{LOCALHOST}:{tls_port}/echo/tls"
        version, status, err = await curl_version(url, "--http2", "-k")
        self.assertEqual((version, status), ("2", 200), err)
        version, status, err = await curl_version(url, "--http1.1", "-k")
        self.assertEqual((version, status), ("1.1", 200), err)
        out, err_bytes, code = await run(CURL, *CURL_BASE, "--http2", "-k", url)
        self.assertEqual(code, 0, err_bytes)
        seen = json.loads(out)
        self.assertEqual(header_values(seen["headers"], "x-forwarded-proto"), ["https"])
        # The cleartext listener still serves both protocols.
        version, status, err = await curl_version(gateway.url("/echo/plain"), "--http2-prior-knowledge")
        self.assertEqual((version, status), ("2", 200), err)
        self.assertNotIn("Traceback", gateway.log())
