"""`edge-sdk serve` refuses what it must with a 4xx JSON error in the API's own shape (the
edge_sdk.errors type and message), never a traceback, and stays healthy after each."""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import zlib

import pytest

from tests.conftest import SERVE_KEY, SERVE_PASSWORD, SERVE_USER, needs_serve

pytestmark = needs_serve
TXT2IMG, OPENAI = "/sdapi/v1/txt2img", "/v1/images/generations"
SMALL = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header says width x height (1-bit gray); its pixel data is a
    few bytes, so decoding it would fail: a size refusal proves the header came first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _healthy(server) -> None:
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok", health


@pytest.mark.parametrize("headers,expected", [
    ({}, 401),
    ({"Authorization": "Bearer wrong-key"}, 401),
    (_basic(SERVE_USER, "wrong"), 401),
    (_basic("mallory", SERVE_PASSWORD), 401),  # --api-auth's password needs its user
    ({"Authorization": f"Bearer {SERVE_KEY}"}, 200),
    (_basic("anyone", SERVE_KEY), 200),
    (_basic(SERVE_USER, SERVE_PASSWORD), 200),
])
def test_credentials(live_server, headers, expected):
    for path, body in ((TXT2IMG, SMALL), (OPENAI, {"prompt": "x", "size": "64x64",
                                                   "steps": 2})):
        status, hdrs, out = live_server.request("POST", path, body, headers=headers)
        assert status == expected, (path, out)
        if expected == 401:
            error = out["error"]["type"] if path == OPENAI else out["error"]
            assert error == "AuthenticationError" and "www-authenticate" in hdrs
    _healthy(live_server)


# every endpoint but /health needs the credentials
GUARDED = [("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/progress"),
           ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"),
           ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/samplers"),
           ("POST", "/sdapi/v1/img2img"), ("GET", "/v1/models"), ("POST", "/v1/images/edits")]


@pytest.mark.parametrize("method,path", GUARDED)
def test_every_endpoint_needs_the_credentials(live_server, method, path):
    status, _, out = live_server.request(method, path, {} if method == "POST" else None)
    assert status == 401, out


def test_a_web_page_cannot_reach_the_loopback_server(live_server):
    """No DNS rebinding (a Host that does not name this machine) and no form-encoded or
    text/plain POST (which a page sends without a preflight)."""
    status, _, out = live_server.request("POST", TXT2IMG, SMALL, key=SERVE_KEY,
                                         headers={"Host": "evil.example:7860"})
    assert status == 403 and out["error"] == "ForbiddenError"
    status, _, out = live_server.request("POST", TXT2IMG, SMALL, key=SERVE_KEY,
                                         headers={"Content-Type": "text/plain"})
    assert status == 422 and "Content-Type: application/json" in out["detail"]
    _healthy(live_server)


A1111_BAD = [
    ("malformed JSON", b'{"prompt": "a", ', 422, "not valid JSON"),
    ("not an object", b'[1, 2]', 422, "JSON object"),
    ("NaN", b'{"prompt": "a", "cfg_scale": NaN}', 422, "not valid JSON"),
    ("steps as text", {"prompt": "a", "steps": "20"}, 422, "steps must be a whole number"),
    ("prompt a number", {"prompt": 5}, 422, "prompt must be a string"),
    ("width a list", {"prompt": "a", "width": [64]}, 422, "width must be a whole number"),
    ("negative width", {"prompt": "a", "width": -64}, 422, "width=-64"),
    ("huge width", {"prompt": "a", "width": 100000, "height": 100000}, 422, "width"),
    ("zero steps", {"prompt": "a", "steps": 0}, 422, "steps=0"),
    ("a billion steps", {"prompt": "a", "steps": 10**9}, 422, "--max-steps"),
    ("huge batch", {"prompt": "a", "batch_size": 1000}, 422, "batch_size=1000"),
    ("over the image limit", {"prompt": "a", "batch_size": 9}, 422, "--max-images"),
    ("bool seed", {"prompt": "a", "seed": True}, 422, "seed must be a whole number"),
    ("unknown sampler", {"prompt": "a", "sampler_name": "Heun++ 9M"}, 422, "Sampler not found"),
    ("hires fix", {"prompt": "a", "enable_hr": True}, 422, "enable_hr"),
    ("path-like model", {"prompt": "a", "override_settings": {
        "sd_model_checkpoint": "../shapes"}}, 404, "is not on this server"),
    ("absolute model path", {"prompt": "a", "override_settings": {
        "sd_model_checkpoint": "/etc/passwd"}}, 404, "is not on this server"),
]


@pytest.mark.parametrize("case,body,status,words", A1111_BAD, ids=[c[0] for c in A1111_BAD])
def test_bad_a1111_requests(live_server, case, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, _, out = live_server.request("POST", TXT2IMG, None if raw else body, raw=raw,
                                      key=SERVE_KEY)
    assert got == status, out
    assert words in out["detail"] and out["error"] in ("InvalidInputError", "SchedulerError",
                                                       "UnknownModelError")
    assert "Traceback" not in json.dumps(out)
    _healthy(live_server)


OPENAI_BAD = [
    ("no prompt", {"size": "64x64"}, 400, "prompt is required"),
    ("url", {"prompt": "a", "response_format": "url"}, 400, "'url' is not offered"),
    ("bad size", {"prompt": "a", "size": "big"}, 400, "WIDTHxHEIGHT"),
    ("negative size", {"prompt": "a", "size": "-64x64"}, 400, "WIDTHxHEIGHT"),
    ("zero n", {"prompt": "a", "n": 0}, 400, "n=0"),
    ("huge n", {"prompt": "a", "n": 1000}, 400, "n=1000"),
    ("n as text", {"prompt": "a", "n": "2"}, 400, "n must be a whole number"),
    ("path-like model", {"prompt": "a", "model": "../../x"}, 404, "is not on this server"),
    ("unknown scheduler", {"prompt": "a", "scheduler": "nope"}, 400, "unknown scheduler"),
]


@pytest.mark.parametrize("case,body,status,words", OPENAI_BAD, ids=[c[0] for c in OPENAI_BAD])
def test_bad_openai_requests(live_server, case, body, status, words):
    got, _, out = live_server.request("POST", OPENAI, body, key=SERVE_KEY)
    assert got == status, out
    assert words in out["error"]["message"] and out["error"]["type"].endswith("Error")
    _healthy(live_server)


def _raw(server, head: str, body_parts: list[bytes]) -> tuple[int, dict]:
    """Send a request by hand (the body in parts, which the server may refuse to read on)
    and read the answer: (status, JSON body)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was read: what we want to see
        data = b""
        while not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    if b"application/json" not in head_bytes.lower():  # uvicorn's own, for broken framing
        return int(head_bytes.split()[1]), {"error": "HTTPError", "text": payload.decode()}
    return int(head_bytes.split()[1]), json.loads(payload)


def _complete(data: bytes) -> bool:
    head, sep, payload = data.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head.lower())
    return bool(sep) and length is not None and len(payload) >= int(length.group(1))


def test_a_body_over_the_limit_is_413(live_server):
    auth = f"Authorization: Bearer {SERVE_KEY}\nContent-Type: application/json\n"
    for path in (TXT2IMG, OPENAI):  # refused from Content-Length, before the body is read
        status, out = _raw(live_server, f"POST {path} HTTP/1.1\nHost: 127.0.0.1\n{auth}"
                           f"Content-Length: {2 * 1024 * 1024}\n", [])
        assert status == 413, out
    # chunked, no Content-Length: refused while reading, once over 1 MiB
    part = b"a" * (300 * 1024)
    chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in [b'{"prompt": "'] + [part] * 5]
    status, out = _raw(live_server, f"POST {TXT2IMG} HTTP/1.1\nHost: 127.0.0.1\n{auth}"
                       "Transfer-Encoding: chunked\n", chunks)
    assert status == 413 and out["error"] == "RequestTooLargeError", out
    _healthy(live_server)


# more malformed A1111 bodies, sent byte for byte: (body, Content-Length or None = its length)
MALFORMED = [(b, None) for b in (
    b"42", b"null", b'"abc"', b"[]", b"{", b"\xff\xfe", b'{"prompt": 5}',
    b'{"prompt": "x", "steps": "many"}', b'{"prompt": "x", "steps": 1e9}',
    b'{"prompt": "x", "width": -64}', b'{"prompt": "x", "width": 4}',
    b'{"prompt": "x", "scheduler": 5}', b'{"prompt": "x", "sampler_name": "nope"}',
    b'{"prompt": "x", "cfg_scale": "high"}', b'{"prompt": "x", "seed": true}',
    b'{"prompt": "' + b"x" * 20000 + b'"}', b'{"prompt": "x", "negative_prompt": 3}',
    b'{"prompt": "x", "negative_prompt": "' + b"x" * 20000 + b'"}',
    b'{"prompt": "x", "width": 8192, "height": 8192}')] + [  # the last: beyond any memory
    (b'{"prompt": "x"}', "abc"), (b'{"prompt": "x"}', str(10**7))]


def test_malformed_bodies_byte_for_byte(live_server):
    auth = f"Authorization: Bearer {SERVE_KEY}\nContent-Type: application/json\n"
    for body, length in MALFORMED:
        head = (f"POST {TXT2IMG} HTTP/1.1\nHost: 127.0.0.1\n{auth}"
                f"Content-Length: {length if length is not None else len(body)}\n")
        status, out = _raw(live_server, head, [] if length is not None else [body])
        assert 400 <= status < 500 and out["error"].endswith("Error"), (body[:40], out)
        if length != "abc":  # (uvicorn's own plain-text 400: a broken Content-Length)
            assert out["error"] != "HTTPError", (body[:40], out)
    _healthy(live_server)


def test_an_image_claiming_20000x20000_is_refused_before_decoding(live_server):
    for side, words in ((20000, "400000000 pixels"), (5000, "5000x5000")):  # PIL's bound, ours
        png = base64.b64encode(_png_claiming(side, side)).decode()
        status, _, out = live_server.request("POST", "/sdapi/v1/img2img", {
            **SMALL, "init_images": [png]}, key=SERVE_KEY)
        assert status == 413 and words in out["detail"], out
    decodable = base64.b64encode(_png_claiming(64, 64)).decode()  # the same bytes, small
    status, _, out = live_server.request("POST", "/sdapi/v1/img2img", {
        **SMALL, "init_images": [decodable]}, key=SERVE_KEY)
    assert status == 422 and "could not be decoded" in out["detail"], out
    status, _, out = live_server.request("POST", "/sdapi/v1/img2img", {
        **SMALL, "init_images": ["https://example.com/cat.png"]}, key=SERVE_KEY)
    assert status == 422 and "does not fetch URLs" in out["detail"]
    status, _, out = live_server.request("POST", "/sdapi/v1/img2img", {
        **SMALL, "init_images": ["not base64!"]}, key=SERVE_KEY)
    assert status == 422 and "base64" in out["detail"]
    _healthy(live_server)


def test_unknown_paths_and_methods_are_json(live_server):
    status, _, out = live_server.request("GET", "/sdapi/v1/nothing", key=SERVE_KEY)
    assert status == 404 and "not an endpoint" in out["detail"]
    status, _, out = live_server.request("GET", TXT2IMG, key=SERVE_KEY)
    assert status == 405 and "not an endpoint" in out["detail"]


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "edge-sdk-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
              f'filename="{k}.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + v + b"\r\n"
              for k, v in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def test_bad_edits(live_server):
    small = _png_claiming(64, 64)
    cases = [
        ({"prompt": "a"}, {"image": _png_claiming(20000, 20000)}, 413, "pixels"),
        ({"prompt": "a"}, {"image": _png_claiming(5000, 5000)}, 413, "5000x5000"),
        ({"prompt": "a"}, {"image": b"not an image"}, 400, "not a PNG"),
        ({"prompt": "a", "size": "\u00b2x\u00b2"}, {"image": small}, 400, "WIDTHxHEIGHT"),
        ({"prompt": "a", "n": "many"}, {"image": small}, 400, "n must be a whole number"),
        ({"prompt": "a"}, {}, 400, "send one image file"),
        ({"prompt": "a", "model": "../x"}, {"image": small}, 404, "is not on this server"),
    ]
    for fields, files, status, words in cases:
        body, ctype = _multipart(fields, files)
        got, _, out = live_server.request("POST", "/v1/images/edits", raw=body, key=SERVE_KEY,
                                          headers={"Content-Type": ctype})
        assert got == status and words in out["error"]["message"], (fields, out)
    for body, ctype in ((b"--x\r\nbroken", "multipart/form-data; boundary=x"),
                        (b'{"prompt": "a"}', "application/json")):
        got, _, out = live_server.request("POST", "/v1/images/edits", raw=body, key=SERVE_KEY,
                                          headers={"Content-Type": ctype})
        assert got == 400 and out["error"]["type"] == "InvalidInputError", out
    _healthy(live_server)
