"""The HTTP/1.1 gateway end to end: a real ``twistd -n txgateway``, real clients.

What a user sees through the gateway (status, headers, bytes), with curl or a
raw socket as the client and small Twisted servers as the upstreams (see
:mod:`tests.integration.harness`).  Each class shares one gateway process.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from typing import Any, Protocol

from twisted.internet.defer import ensureDeferred

from tests.integration.harness import (
    CURL,
    PATTERN_PERIOD,
    DribbleUpstream,
    EchoUpstream,
    FixedResponse,
    FixedUpstream,
    GarbageUpstream,
    GatewayTestCase,
    GiB,
    KiB,
    MiB,
    SilentUpstream,
    SourceUpstream,
    StalledUpstream,
    parse_responses,
    pattern_bytes,
    pattern_sha256,
    reactor,
    run,
    sleep,
)

VIA = "1.1 txgateway"
SHA256SUM = shutil.which("sha256sum") or "/usr/bin/sha256sum"
BASH = shutil.which("bash") or "/bin/bash"


class _Answer(Protocol):
    status: int
    body: bytes

    def header(self, name: bytes) -> bytes | None: ...


def upstream(config: dict[str, int], name: str) -> dict[str, Any]:
    return {"servers": [{"address": f"127.0.0.1:{config[name]}"}], "timeouts": {"connect": 2, "request": 10}}


def fixed_responses() -> dict[str, FixedResponse]:
    return {
        "/fixed/cookies": FixedResponse(
            200,
            [
                ("Content-Type", "text/plain"),
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                ("Via", "1.1 upstream-cache"),
            ],
            b"two cookies\n",
        ),
        "/fixed/hop": FixedResponse(
            200,
            [
                ("Content-Type", "text/plain"),
                ("Connection", "x-private"),
                ("X-Private", "upstream-secret"),
                ("Keep-Alive", "timeout=5, max=100"),
                ("Proxy-Authenticate", 'Basic realm="upstream"'),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("X-Kept", "yes"),
            ],
            b"hop-by-hop\n",
        ),
        "/fixed/head": FixedResponse(200, [("Content-Type", "text/plain")], b"h" * 1234),
        "/fixed/204": FixedResponse(204, [("X-Status", "no-content")]),
        "/fixed/304": FixedResponse(304, [("ETag", '"v1"'), ("Content-Length", "1234")]),
        "/fixed/503": FixedResponse(
            503, [("Content-Type", "text/plain"), ("Retry-After", "7")], b"upstream says: maintenance\n"
        ),
        "/fixed/truncated": FixedResponse(200, [("Content-Type", "text/plain")], b"t" * 100000, truncate=1000),
    }


def header_names(seen: list[list[str]]) -> list[str]:
    return [name.lower() for name, _ in seen]


def header_values(seen: list[list[str]], name: str) -> list[str]:
    return [value for n, value in seen if n.lower() == name]


class ProxyTests(GatewayTestCase):
    """Forwarding, headers, routing, errors, streaming and HTTP/1.1 semantics."""

    upstreams = {
        "echo": EchoUpstream,
        "fixed": lambda: FixedUpstream(fixed_responses()),
        "source": SourceUpstream,
        "dribble": DribbleUpstream,
        "silent": SilentUpstream,
        "garbage": GarbageUpstream,
        "stalled": StalledUpstream,
    }
    unreachable = ("refused",)

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        def route(name: str, path: str, target: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "match": {"path": path, **extra.pop("match", {})}, "upstream": target, **extra}

        return {
            "server": {
                "limits": {
                    "max_header_bytes": "8KiB",
                    "max_body_bytes": "1MiB",
                    "header_timeout": 10,
                    "idle_timeout": 60,
                },
                "trusted_proxies": ["127.0.0.1/32"],
            },
            "upstreams": {name: upstream(ports, name) for name in ports},
            "routes": [
                route("echo", "/echo/*", "echo"),
                route("get-only", "/only-get/{id}", "echo", match={"methods": ["GET"]}),
                route("strip", "/api/*", "echo", strip_prefix="/api"),
                route("rewrite", "/users/{id}/orders/{order}", "echo", rewrite="/v2/orders/{order}/by-user/{id}"),
                route(
                    "site-a",
                    "/site/*",
                    "echo",
                    match={"host": "a.example.com"},
                    headers={"request": {"set": {"x-matched": "site-a"}}},
                ),
                route(
                    "site-org",
                    "/site/*",
                    "echo",
                    match={"host": "*.example.org"},
                    headers={"request": {"set": {"x-matched": "site-org"}}},
                ),
                route("upload", "/upload/*", "echo", max_body_bytes="64MiB"),
                route("small", "/small/*", "echo", max_body_bytes="1KiB"),
                route("fixed", "/fixed/*", "fixed"),
                route("download", "/download/*", "source"),
                route("dribble", "/dribble/*", "dribble"),
                route("silent", "/silent/*", "silent", timeout=1),
                route("garbage", "/garbage/*", "garbage"),
                route("stalled", "/stalled/*", "stalled", max_body_bytes="1GiB"),
                route("refused", "/refused/*", "refused"),
            ],
        }

    # Helpers.

    def assert_error(self, answer: _Answer, status: int, code: str) -> dict[str, Any]:
        """A gateway error: the status, one JSON shape, and the request id both ways."""
        self.assertEqual(answer.status, status, answer.body[:500])
        self.assertEqual(answer.header(b"content-type"), b"application/json")
        payload: dict[str, Any] = json.loads(answer.body)
        self.assertEqual(payload["error"], code)
        self.assertIsInstance(payload["message"], str)
        self.assertIsInstance(payload["request_id"], str, f"no request_id in {payload}")
        self.assertTrue(payload["request_id"])
        self.assertEqual(answer.header(b"x-request-id"), payload["request_id"].encode())
        return payload

    def echo_seen(self) -> dict[str, Any]:
        """What the echo upstream received last."""
        requests = self.servers["echo"].requests
        self.assertTrue(requests, "the echo upstream received nothing")
        return requests[-1].describe()

    # 1. GET/POST, request id, Via, Host.

    async def test_get(self) -> None:
        result = await self.curl("/echo/hello?x=1&y=two")
        self.assertEqual(result.exit_code, 0, result.stderr)
        self.assertEqual(result.status, 200)
        seen = result.json()
        self.assertEqual((seen["method"], seen["path"], seen["query"]), ("GET", "/echo/hello", "x=1&y=two"))
        request_id = result.header(b"x-request-id")
        self.assertTrue(request_id)
        assert request_id is not None
        self.assertEqual(header_values(seen["headers"], "x-request-id"), [request_id.decode()])
        self.assertEqual(result.header_values(b"via"), [VIA.encode()])
        self.assertEqual(header_values(seen["headers"], "via"), [VIA])
        self.assertEqual(header_values(seen["headers"], "host"), [f"127.0.0.1:{self.port}"])

    async def test_post(self) -> None:
        result = await self.curl("/echo/form", "--data-binary", "hello, upstream", "-H", "Content-Type: text/plain")
        self.assertEqual(result.status, 200)
        seen = result.json()
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["body_bytes"], 15)
        self.assertEqual(seen["body_sha256"], _sha256(b"hello, upstream"))
        self.assertEqual(header_values(seen["headers"], "content-type"), ["text/plain"])
        self.assertTrue(result.header(b"x-request-id"))
        self.assertEqual(result.header_values(b"via"), [VIA.encode()])

    async def test_request_id_kept_when_sane(self) -> None:
        result = await self.curl("/echo/id", "-H", "X-Request-ID: client-id-42.abc")
        self.assertEqual(result.header(b"x-request-id"), b"client-id-42.abc")
        self.assertEqual(header_values(result.json()["headers"], "x-request-id"), ["client-id-42.abc"])

    async def test_request_id_replaced_when_not_sane(self) -> None:
        result = await self.curl("/echo/id", "-H", "X-Request-ID: has spaces in it", "-H", "X-Request-ID: second")
        request_id = result.header(b"x-request-id")
        self.assertNotIn(request_id, (b"has spaces in it", b"second", None))
        assert request_id is not None
        self.assertEqual(header_values(result.json()["headers"], "x-request-id"), [request_id.decode()])

    async def test_via_appended_both_ways(self) -> None:
        result = await self.curl("/echo/via", "-H", "Via: 1.0 fred")
        self.assertEqual(header_values(result.json()["headers"], "via"), [f"1.0 fred, {VIA}"])
        result = await self.curl("/fixed/cookies")
        self.assertEqual(result.header_values(b"via"), [f"1.1 upstream-cache, {VIA}".encode()])

    async def test_host_forwarded_as_sent(self) -> None:
        result = await self.curl("/echo/host", "-H", "Host: Custom.Example:1234")
        seen = result.json()
        self.assertEqual(header_values(seen["headers"], "host"), ["Custom.Example:1234"])

    # 2. Repeated headers.

    async def test_repeated_request_headers_kept(self) -> None:
        result = await self.curl("/echo/repeat", "-H", "X-A: 1", "-H", "X-A: 2")
        self.assertEqual(header_values(result.json()["headers"], "x-a"), ["1", "2"])

    async def test_repeated_set_cookie_kept(self) -> None:
        result = await self.curl("/fixed/cookies")
        self.assertEqual(result.status, 200)
        self.assertEqual(result.header_values(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/; HttpOnly"])
        self.assertEqual(result.body, b"two cookies\n")

    # 3. Hop-by-hop headers.

    async def test_hop_by_hop_request_headers_removed(self) -> None:
        result = await self.curl(
            "/echo/hop",
            "-H", "Connection: close, X-Private",
            "-H", "X-Private: client-secret",
            "-H", "Keep-Alive: timeout=5",
            "-H", "TE: trailers",
            "-H", "Upgrade: websocket",
            "-H", "Proxy-Authorization: Basic dXNlcjpwYXNz",
            "-H", "Proxy-Connection: keep-alive",
            "-H", "X-Kept: yes",
        )  # fmt: skip
        self.assertEqual(result.status, 200)
        seen = result.json()["headers"]
        names = header_names(seen)
        for name in ("x-private", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection"):
            self.assertNotIn(name, names, f"{name} reached the upstream: {seen}")
        for value in header_values(seen, "connection"):
            self.assertNotIn("x-private", value.lower())
        self.assertNotIn("client-secret", json.dumps(seen))
        self.assertEqual(header_values(seen, "x-kept"), ["yes"])

    async def test_hop_by_hop_response_headers_removed(self) -> None:
        result = await self.curl("/fixed/hop")
        self.assertEqual(result.status, 200)
        names = [name for name, _ in result.headers]
        for name in (
            b"x-private",
            b"keep-alive",
            b"te",
            b"trailer",
            b"upgrade",
            b"proxy-authenticate",
            b"proxy-connection",
        ):
            self.assertNotIn(name, names, f"{name!r} reached the client: {result.headers}")
        for value in result.header_values(b"connection"):
            self.assertNotIn(b"x-private", value.lower())
        self.assertEqual(result.header_values(b"x-kept"), [b"yes"])
        self.assertEqual(result.body, b"hop-by-hop\n")

    # 4. X-Forwarded-*.

    async def test_forwarded_headers_replaced_for_untrusted_client(self) -> None:
        # 127.0.0.2 is not in trusted_proxies (127.0.0.1/32): its claims are replaced.
        result = await self.curl(
            "/echo/xff",
            "--interface", "127.0.0.2",
            "-H", "X-Forwarded-For: 203.0.113.9",
            "-H", "X-Forwarded-Proto: https",
            "-H", "X-Forwarded-Host: evil.example",
        )  # fmt: skip
        self.assertEqual(result.exit_code, 0, result.stderr)
        seen = result.json()["headers"]
        self.assertEqual(header_values(seen, "x-forwarded-for"), ["127.0.0.2"])
        self.assertEqual(header_values(seen, "x-forwarded-proto"), ["http"])
        self.assertEqual(header_values(seen, "x-forwarded-host"), [f"127.0.0.1:{self.port}"])

    async def test_forwarded_headers_kept_for_trusted_proxy(self) -> None:
        result = await self.curl(
            "/echo/xff",
            "-H", "X-Forwarded-For: 203.0.113.9, 198.51.100.2",
            "-H", "X-Forwarded-Proto: https",
            "-H", "X-Forwarded-Host: shop.example",
        )  # fmt: skip
        seen = result.json()["headers"]
        self.assertEqual(header_values(seen, "x-forwarded-for"), ["203.0.113.9, 198.51.100.2, 127.0.0.1"])
        self.assertEqual(header_values(seen, "x-forwarded-proto"), ["https"])
        self.assertEqual(header_values(seen, "x-forwarded-host"), ["shop.example"])

    async def test_forwarded_headers_set_for_trusted_proxy_without_prior(self) -> None:
        seen = (await self.curl("/echo/xff")).json()["headers"]
        self.assertEqual(header_values(seen, "x-forwarded-for"), ["127.0.0.1"])
        self.assertEqual(header_values(seen, "x-forwarded-proto"), ["http"])
        self.assertEqual(header_values(seen, "x-forwarded-host"), [f"127.0.0.1:{self.port}"])

    # 5. Routing.

    async def test_not_found(self) -> None:
        result = await self.curl("/nowhere/at/all")
        self.assert_error(result, 404, "not_found")
        self.assertEqual(self.servers["echo"].requests, [])

    async def test_method_not_allowed(self) -> None:
        result = await self.curl("/only-get/1", "-X", "POST", "--data-binary", "x")
        self.assert_error(result, 405, "method_not_allowed")
        allow = result.header(b"allow")
        assert allow is not None
        self.assertIn(b"GET", [m.strip() for m in allow.split(b",")])
        self.assertEqual((await self.curl("/only-get/1")).status, 200)

    async def test_strip_prefix(self) -> None:
        result = await self.curl("/api/things/7?page=2&sort=-name")
        self.assertEqual(result.status, 200)
        seen = result.json()
        self.assertEqual((seen["path"], seen["query"]), ("/things/7", "page=2&sort=-name"))

    async def test_rewrite_with_parameters(self) -> None:
        result = await self.curl("/users/42/orders/9001?expand=items")
        self.assertEqual(result.status, 200)
        seen = result.json()
        self.assertEqual((seen["path"], seen["query"]), ("/v2/orders/9001/by-user/42", "expand=items"))

    async def test_host_match(self) -> None:
        exact = await self.curl("/site/page", "-H", "Host: a.example.com")
        self.assertEqual(exact.status, 200)
        self.assertEqual(header_values(exact.json()["headers"], "x-matched"), ["site-a"])
        wildcard = await self.curl("/site/page", "-H", "Host: shop.example.org:8080")
        self.assertEqual(wildcard.status, 200)
        self.assertEqual(header_values(wildcard.json()["headers"], "x-matched"), ["site-org"])
        other = await self.curl("/site/page", "-H", "Host: b.example.com")
        self.assert_error(other, 404, "not_found")

    # 6. Errors.

    async def test_upstream_refused(self) -> None:
        result = await self.curl("/refused/x")
        self.assert_error(result, 502, "bad_gateway")

    async def test_upstream_garbage(self) -> None:
        result = await self.curl("/garbage/x")
        self.assert_error(result, 502, "bad_gateway")
        self.assertEqual(len(self.servers["garbage"].requests), 1)

    async def test_upstream_timeout(self) -> None:
        started = reactor.seconds()
        result = await self.curl("/silent/x", timeout=15)
        elapsed = reactor.seconds() - started
        self.assert_error(result, 504, "gateway_timeout")
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 5)

    async def test_body_over_limit_declared(self) -> None:
        payload = self.mktemp()
        with open(payload, "wb") as f:
            f.write(b"x" * 4 * KiB)
        result = await self.curl("/small/upload", "--data-binary", f"@{payload}")
        self.assert_error(result, 413, "payload_too_large")
        self.assertEqual(self.servers["echo"].requests, [])
        # The server-wide limit (1 MiB) on a route without its own.
        with open(payload, "wb") as f:
            f.write(b"y" * 2 * MiB)
        result = await self.curl("/echo/upload", "--data-binary", f"@{payload}")
        self.assert_error(result, 413, "payload_too_large")

    async def test_body_over_limit_chunked(self) -> None:
        payload = self.mktemp()
        with open(payload, "wb") as f:
            f.write(b"x" * 4 * KiB)
        result = await self.curl("/small/upload", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}")
        self.assert_error(result, 413, "payload_too_large")
        for seen in self.servers["echo"].requests:
            self.assertFalse(seen.complete, "the upstream received the whole oversized body")

    async def test_head_over_limit(self) -> None:
        result = await self.curl("/echo/big-head", "-H", "X-Big: " + "a" * (9 * KiB))
        self.assertEqual(self.servers["echo"].requests, [])
        self.assert_error(result, 431, "headers_too_large")

    async def test_malformed_request_line(self) -> None:
        client = await self.connect()
        client.send(b"THIS IS NOT HTTP\r\n\r\n")
        received = await client.wait_closed()
        (response,) = parse_responses(received, until_close=True)
        self.assert_error(response, 400, "bad_request")

    async def test_malformed_header_line(self) -> None:
        client = await self.connect()
        client.send(b"GET /echo/x HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
        received = await client.wait_closed()
        self.assertEqual(self.servers["echo"].requests, [])
        (response,) = parse_responses(received, until_close=True)
        self.assert_error(response, 400, "bad_request")

    async def test_bad_chunked_framing(self) -> None:
        client = await self.connect()
        client.send(b"POST /echo/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        received = await client.wait_closed()
        (response,) = parse_responses(received, until_close=True)
        self.assert_error(response, 400, "bad_request")
        for seen in self.servers["echo"].requests:
            self.assertFalse(seen.complete, "the upstream was handed a complete body")

    async def test_content_length_with_transfer_encoding_refused(self) -> None:
        """Both framings at once is the request-smuggling pattern: refused, never forwarded."""
        client = await self.connect()
        client.send(
            b"POST /echo/x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        received = await client.wait_closed()
        self.assertNotIn("/echo/smuggled", [seen.path for seen in self.servers["echo"].requests])
        (response,) = parse_responses(received, until_close=True)
        self.assert_error(response, 400, "bad_request")

    async def test_unknown_transfer_coding_refused(self) -> None:
        """``gzip, chunked``: the gateway removes the chunked framing but cannot undo gzip.

        Forwarding the body with the coding dropped would hand the upstream
        gzip bytes as a plain body; RFC 9112 6.1 says answer 501 instead.
        """
        client = await self.connect()
        client.send(
            b"POST /echo/te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        (response,) = await client.wait_responses(1)
        self.assertEqual(self.servers["echo"].requests, [], "forwarded with the gzip transfer coding dropped")
        self.assertIn(response.status, (400, 501))

    async def test_upstream_error_status_passes_through(self) -> None:
        result = await self.curl("/fixed/503")
        self.assertEqual(result.status, 503)
        self.assertEqual(result.body, b"upstream says: maintenance\n")
        self.assertEqual(result.header(b"retry-after"), b"7")
        self.assertEqual(result.header(b"content-type"), b"text/plain")

    async def test_upstream_truncated_body_aborts_client(self) -> None:
        """A response cut short upstream fails for the client too, never silently complete.

        The client may see the head and part of the body before the reset, or
        (when it all happens within one reactor turn, as here) only the reset.
        """
        result = await self.curl("/fixed/truncated")
        self.assertIn(result.exit_code, (18, 52, 56), result.stderr)  # partial file, empty reply, reset
        self.assertLess(len(result.body), 100000)
        if result.status:
            self.assertEqual((result.status, result.header(b"content-length")), (200, b"100000"))

    async def test_dot_segments_removed_before_routing_and_forwarding(self) -> None:
        result = await self.curl("/api/../echo/a/./b/../c", "--path-as-is")
        self.assertEqual(result.status, 200)
        self.assertEqual(result.json()["path"], "/echo/a/c")

    async def test_absolute_form_target(self) -> None:
        client = await self.connect()
        client.send(b"GET http://a.example.com/site/abs?q=1 HTTP/1.1\r\nHost: ignored.example.net\r\n\r\n")
        (response,) = await client.wait_responses(1)
        self.assertEqual(response.status, 200)
        seen = response.json()
        self.assertEqual((seen["path"], seen["query"]), ("/site/abs", "q=1"))
        self.assertEqual(header_values(seen["headers"], "x-matched"), ["site-a"])

    # 7. Streaming (the 1 GiB runs are in StreamingTests).

    async def test_chunked_upload_streams_intact(self) -> None:
        payload = self.mktemp()
        size = 32 * MiB + 12345
        with open(payload, "wb") as f:
            offset = 0
            while offset < size:
                piece = min(PATTERN_PERIOD // 2, size - offset)
                f.write(pattern_bytes(offset, piece))
                offset += piece
        result = await self.curl("/upload/chunked", "-T", payload, "-H", "Transfer-Encoding: chunked", timeout=30)
        self.assertEqual(result.status, 200, result.body[:300])
        seen = result.json()
        self.assertEqual(header_values(seen["headers"], "transfer-encoding"), ["chunked"])
        self.assertEqual(seen["body_bytes"], size)
        with open(payload, "rb") as f:
            self.assertEqual(seen["body_sha256"], _sha256_file(f))

    async def test_download_streams_intact(self) -> None:
        source = self.servers["source"]
        assert isinstance(source, SourceUpstream)
        size = 8 * MiB + 7
        for query in ("", "?chunked=1"):
            result = await self.curl(f"/download/{size}{query}", timeout=30)
            self.assertEqual(result.status, 200)
            self.assertEqual(len(result.body), size)
            self.assertEqual(_sha256(result.body), source.records[-1].sha.hexdigest())
            self.assertEqual(_sha256(result.body), pattern_sha256(size))

    async def test_slow_client_pauses_upstream(self) -> None:
        """A client that stops reading stops the upstream's writes: nothing piles up in between."""
        source = self.servers["source"]
        assert isinstance(source, SourceUpstream)
        client = await self.connect()
        client.send(b"GET /download/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (512 * MiB))
        await client.wait_for(lambda data: len(data) > MiB, timeout=10)
        assert client.transport is not None
        client.transport.pauseProducing()  # type: ignore[attr-defined]
        memory = self.gateway.memory()["VmRSS"]
        await sleep(1.0)
        sent = source.records[-1].sent
        await sleep(0.5)
        self.assertEqual(source.records[-1].sent, sent, "the upstream kept sending to a client that does not read")
        self.assertLess(sent, 64 * MiB)
        self.assertGreater(source.records[-1].pauses, 0)
        self.assertLess(self.gateway.memory()["VmRSS"] - memory, 16 * MiB)

    async def test_slow_upstream_pauses_client_upload(self) -> None:
        """An upstream that stops reading stops the client's upload: the gateway does not buffer it."""
        payload = self.mktemp()
        with open(payload, "wb") as f:
            f.truncate(512 * MiB)
        memory = self.gateway.memory()["VmRSS"]
        out, err, code = await run(
            CURL, "-sS", "--noproxy", "*", "--max-time", "3", "-o", "/dev/null",
            "-w", "%{size_upload}", "-T", payload, self.url("/stalled/upload"),
        )  # fmt: skip
        self.assertEqual(code, 28, err)  # CURLE_OPERATION_TIMEDOUT: still uploading when curl gave up
        self.assertLess(int(out), 64 * MiB, "the client could upload far more than the socket buffers hold")
        self.assertLess(self.gateway.memory()["VmRSS"] - memory, 16 * MiB)

    async def test_chunked_response_arrives_piece_by_piece(self) -> None:
        dribble = self.servers["dribble"]
        assert isinstance(dribble, DribbleUpstream)
        client = await self.connect()
        client.send(b"GET /dribble/x?pieces=4&delay=0.4 HTTP/1.1\r\nHost: t\r\n\r\n")
        await client.wait_for(lambda data: b"piece-0\n" in data, timeout=5)
        record = dribble.records[-1]
        self.assertFalse(record.finished, "the first piece only arrived once the upstream had finished")
        self.assertLess(record.written, 4)
        (response,) = await client.wait_responses(1, timeout=10)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"piece-0\npiece-1\npiece-2\npiece-3\n")
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")

    # 8. Keep-alive, pipelining and HTTP/1.1 semantics over a raw socket.

    async def test_pipelined_requests_answered_in_order(self) -> None:
        client = await self.connect()
        client.send(
            b"GET /echo/one HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /echo/two HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /echo/three HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        responses = await client.wait_responses(3)
        self.assertEqual([r.status for r in responses], [200, 200, 200])
        self.assertEqual([r.json()["path"] for r in responses], ["/echo/one", "/echo/two", "/echo/three"])
        self.assertEqual(responses[1].json()["body_bytes"], 3)
        for response in responses:
            self.assertNotEqual(response.header(b"connection"), b"close")
        # Still open: a fourth request on the same connection.
        client.send(b"GET /echo/four HTTP/1.1\r\nHost: t\r\n\r\n")
        responses = await client.wait_responses(4)
        self.assertEqual(responses[3].json()["path"], "/echo/four")
        self.assertFalse(client.is_closed)

    async def test_keep_alive_after_gateway_error(self) -> None:
        client = await self.connect()
        client.send(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\nGET /echo/next HTTP/1.1\r\nHost: t\r\n\r\n")
        missing, found = await client.wait_responses(2)
        self.assertEqual((missing.status, found.status), (404, 200))
        self.assertEqual(found.json()["path"], "/echo/next")

    async def test_pipelined_malformed_request_answered_in_order(self) -> None:
        """A bad request behind a good one: the good one is answered first, then 400, then close."""
        client = await self.connect()
        client.send(b"GET /echo/first HTTP/1.1\r\nHost: t\r\n\r\nBROKEN\x01 / HTTP/1.1\r\n\r\n")
        received = await client.wait_closed()
        first, second = parse_responses(received, until_close=True)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.json()["path"], "/echo/first")
        self.assertEqual(second.status, 400)
        self.assertEqual(json.loads(second.body)["error"], "bad_request")

    async def test_expect_100_continue(self) -> None:
        client = await self.connect()
        client.send(b"POST /echo/expect HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        interim = await client.wait_for(lambda data: b"\r\n\r\n" in data, timeout=5)
        self.assertTrue(interim.startswith(b"HTTP/1.1 100 "), interim)
        client.send(b"hello world")
        (response,) = await client.wait_responses(1)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["body_bytes"], 11)
        self.assertEqual(parse_responses(client.received)[0].status, 100)

    async def test_expect_100_continue_not_sent_for_refused_request(self) -> None:
        client = await self.connect()
        client.send(b"POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        (response,) = await client.wait_responses(1)
        self.assert_error(response, 404, "not_found")
        self.assertFalse(client.received.startswith(b"HTTP/1.1 100"))

    async def test_head_has_headers_and_no_body(self) -> None:
        client = await self.connect()
        client.send(b"HEAD /fixed/head HTTP/1.1\r\nHost: t\r\n\r\nGET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n")
        head, after = await client.wait_responses(2, head_only=(0,))
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header(b"content-length"), b"1234")
        self.assertEqual(head.raw_body, b"")
        # Had the gateway sent any body bytes, they would have broken this response.
        self.assertEqual(after.status, 200)
        self.assertEqual(after.json()["path"], "/echo/after")

    async def test_204_and_304_have_no_body(self) -> None:
        client = await self.connect()
        client.send(
            b"GET /fixed/204 HTTP/1.1\r\nHost: t\r\n\r\n"
            b'GET /fixed/304 HTTP/1.1\r\nHost: t\r\nIf-None-Match: "v1"\r\n\r\n'
            b"GET /echo/after HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        no_content, not_modified, after = await client.wait_responses(3)
        self.assertEqual((no_content.status, no_content.raw_body), (204, b""))
        self.assertEqual(no_content.header(b"x-status"), b"no-content")
        self.assertIsNone(no_content.header(b"transfer-encoding"))
        self.assertEqual((not_modified.status, not_modified.raw_body), (304, b""))
        self.assertEqual(not_modified.header(b"etag"), b'"v1"')
        self.assertEqual(after.json()["path"], "/echo/after")

    async def test_http10_request(self) -> None:
        (response,) = await self.exchange(b"GET /echo/old?v=1.0 HTTP/1.0\r\nHost: t\r\n\r\n")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["path"], "/echo/old")
        self.assertEqual(response.json()["query"], "v=1.0")

    async def test_http10_streamed_response_is_close_delimited(self) -> None:
        (response,) = await self.exchange(b"GET /dribble/x?pieces=3&delay=0.05 HTTP/1.0\r\n\r\n")
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header(b"transfer-encoding"))
        self.assertEqual(response.body, b"piece-0\npiece-1\npiece-2\n")

    async def test_http10_keep_alive(self) -> None:
        client = await self.connect()
        client.send(b"GET /echo/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        (first,) = await client.wait_responses(1)
        self.assertEqual(first.header(b"connection"), b"keep-alive")
        client.send(b"GET /echo/b HTTP/1.0\r\n\r\n")
        await client.wait_closed()
        first, second = parse_responses(client.received)
        self.assertEqual(second.json()["path"], "/echo/b")

    # 9. Client goes away.

    async def test_client_disconnect_cancels_upstream(self) -> None:
        dribble = self.servers["dribble"]
        assert isinstance(dribble, DribbleUpstream)
        client = await self.connect()
        client.send(b"GET /dribble/slow?pieces=200&delay=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
        await client.wait_for(lambda data: b"piece-0\n" in data, timeout=5)
        record = dribble.records[-1]
        assert client.transport is not None
        client.transport.loseConnection()
        gone_at = reactor.seconds()
        await record.connection.when_lost().addTimeout(3, reactor)
        self.assertLess(reactor.seconds() - gone_at, 2.0)
        self.assertFalse(record.finished)


class LimitsTests(GatewayTestCase):
    """Slowloris, idle keep-alive and max_connections, on a gateway with tight limits."""

    upstreams = {"echo": EchoUpstream}

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "server": {
                "limits": {"header_timeout": 1, "idle_timeout": 2, "max_connections": 2},
            },
            "upstreams": {"echo": upstream(ports, "echo")},
            "routes": [{"name": "echo", "match": {"path": "/echo/*"}, "upstream": "echo"}],
        }

    def assert_request_timeout(self, received: bytes) -> None:
        (response,) = parse_responses(received, until_close=True)
        self.assertEqual(response.status, 408)
        payload = json.loads(response.body)
        self.assertEqual(payload["error"], "request_timeout")
        self.assertIsInstance(payload["request_id"], str, f"no request_id in {payload}")

    async def test_partial_head_gets_408_and_close(self) -> None:
        client = await self.connect()
        client.send(b"GET /echo/slow HTTP/1.1\r\nHost: t\r\nX-Partial: ")
        received = await client.wait_closed(timeout=5)
        elapsed = client.closed_at - client.connected_at
        self.assertGreater(elapsed, 0.8)
        self.assertLess(elapsed, 3)
        self.assertEqual(self.servers["echo"].requests, [])
        self.assert_request_timeout(received)

    async def test_trickled_head_gets_408(self) -> None:
        """A client that keeps sending a byte at a time does not reset the head deadline."""
        client = await self.connect()
        head = b"GET /echo/slow HTTP/1.1\r\nHost: t\r\nX-Trickle: " + b"a" * 100
        for byte in range(len(head)):
            if client.is_closed:
                break
            client.send(head[byte : byte + 1])
            await sleep(0.1)
        received = await client.wait_closed(timeout=5)
        self.assertLess(client.closed_at - client.connected_at, 3)
        self.assert_request_timeout(received)

    async def test_idle_keep_alive_closed(self) -> None:
        client = await self.connect()
        client.send(b"GET /echo/a HTTP/1.1\r\nHost: t\r\n\r\n")
        await client.wait_responses(1)
        answered = reactor.seconds()
        received = await client.wait_closed(timeout=6)
        self.assertGreater(client.closed_at - answered, 1.5)
        self.assertEqual(len(parse_responses(received)), 1)

    async def test_max_connections(self) -> None:
        first = await self.connect()
        second = await self.connect()
        for client in (first, second):
            client.send(b"GET /echo/in HTTP/1.1\r\nHost: t\r\n\r\n")
            (response,) = await client.wait_responses(1)
            self.assertEqual(response.status, 200)
        third = await self.connect()
        third.send(b"GET /echo/refused HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(await third.wait_closed(timeout=5), b"")
        # The first two keep working.
        for client in (first, second):
            client.send(b"GET /echo/again HTTP/1.1\r\nHost: t\r\n\r\n")
            responses = await client.wait_responses(2)
            self.assertEqual(responses[1].json()["path"], "/echo/again")
        self.assertEqual(
            [r.path for r in self.servers["echo"].requests], ["/echo/in", "/echo/in", "/echo/again", "/echo/again"]
        )
        # Once one goes, a new connection is served again.
        await first.abort()
        for _ in range(20):
            fourth = await self.connect()
            fourth.send(b"GET /echo/later HTTP/1.1\r\nHost: t\r\n\r\n")
            try:
                (response,) = await fourth.wait_responses(1, timeout=2)
            except Exception:  # noqa: BLE001 - the gateway may not have seen the close yet
                await sleep(0.05)
                continue
            self.assertEqual(response.status, 200)
            break
        else:
            self.fail("no new connection was served after one of the two closed")

    async def test_untrusted_client_forwarded_for(self) -> None:
        """No trusted_proxies configured: the client's own X-Forwarded-For is replaced."""
        result = await self.curl("/echo/xff", "-H", "X-Forwarded-For: 10.9.8.7")
        self.assertEqual(header_values(result.json()["headers"], "x-forwarded-for"), ["127.0.0.1"])


class StreamingTests(GatewayTestCase):
    """1 GiB both ways through a fresh gateway whose memory must not follow the body size."""

    upstreams = {"echo": EchoUpstream, "source": SourceUpstream}
    #: Growth of the gateway's peak RSS allowed while a body streams through.
    MEMORY_BOUND = 32 * MiB
    SIZE = 1 * GiB

    @classmethod
    def gateway_config(cls, ports: dict[str, int]) -> dict[str, Any]:
        return {
            "server": {"limits": {"max_body_bytes": 2 * GiB}},
            "upstreams": {name: upstream(ports, name) for name in ports},
            "routes": [
                {"name": "upload", "match": {"path": "/upload/*"}, "upstream": "echo"},
                {"name": "download", "match": {"path": "/download/*"}, "upstream": "source"},
            ],
        }

    async def warm_up(self) -> int:
        """A few requests first, so one-time allocations are not counted; the RSS after them."""
        for _ in range(3):
            await self.curl("/upload/warm", "--data-binary", "x" * 100000)
            await self.curl("/download/200000")
        self.gateway.reset_peak()
        return self.gateway.memory()["VmRSS"]

    def assert_memory_bounded(self, before: int) -> None:
        memory = self.gateway.memory()
        growth = self.growth = memory["VmHWM"] - before
        self.assertLess(
            growth,
            self.MEMORY_BOUND,
            f"gateway peak RSS grew by {growth / MiB:.1f} MiB (from {before / MiB:.1f} to "
            f"{memory['VmHWM'] / MiB:.1f} MiB) while {self.SIZE / MiB:.0f} MiB streamed through",
        )

    async def test_download_1gib(self) -> None:
        before = await self.warm_up()
        started = reactor.seconds()
        # curl writes the body to sha256sum; status and size go to stderr.
        download = shlex.join(
            [CURL, "-sS", "--noproxy", "*", "--max-time", "120", "-w", "%{stderr}%{http_code} %{size_download}",
             self.url(f"/download/{self.SIZE}")]
        )  # fmt: skip
        out, err, code = await run(BASH, "-o", "pipefail", "-c", f"{download} | {shlex.quote(SHA256SUM)}")
        elapsed = reactor.seconds() - started
        self.assertEqual(code, 0, err)
        status, size = err.split()[-2:]
        self.assertEqual((status, int(size)), (b"200", self.SIZE))
        source = self.servers["source"]
        assert isinstance(source, SourceUpstream)
        record = source.records[-1]
        self.assertEqual(out.split()[0].decode(), record.sha.hexdigest())
        self.assert_memory_bounded(before)
        self.assertGreater(record.pauses, 0, "the upstream was never paused: no backpressure")
        self.report("download", elapsed)

    async def test_upload_1gib(self) -> None:
        before = await self.warm_up()
        payload = self.mktemp()
        with open(payload, "wb") as f:
            f.truncate(self.SIZE)  # sparse: no disk, all zeros
        expected = ensureDeferred(_sha256_of_file(payload))
        started = reactor.seconds()
        result = await self.curl("/upload/big", "-T", payload, timeout=120)
        elapsed = reactor.seconds() - started
        self.assertEqual(result.exit_code, 0, result.stderr)
        self.assertEqual(result.status, 200, result.body[:300])
        seen = result.json()
        self.assertEqual(seen["body_bytes"], self.SIZE)
        self.assertEqual(seen["body_sha256"], await expected)
        self.assert_memory_bounded(before)
        self.report("upload", elapsed)

    def report(self, what: str, elapsed: float) -> None:
        print(
            f"\n  {what} of {self.SIZE / MiB:.0f} MiB through the gateway: {elapsed:.1f}s, "
            f"peak RSS growth {self.growth / MiB:.1f} MiB",
            end=" ",
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(f: Any) -> str:
    sha = hashlib.sha256()
    for block in iter(lambda: f.read(MiB), b""):
        sha.update(block)
    return sha.hexdigest()


async def _sha256_of_file(path: str) -> str:
    """sha256sum in a subprocess, so the reactor keeps serving while it runs."""
    out, err, code = await run(SHA256SUM, path)
    if code != 0:
        raise RuntimeError(err)
    return out.split()[0].decode()
