"""Who may call the server, and how much a request may carry.

Credentials: an API key, sent as a bearer token (OpenAI clients) or as the password of HTTP
basic auth with any user name; or A1111's `--api-auth USER:PASS` (webuiapi's `set_auth`),
basic auth with that user and password. Compared in constant time (hmac.compare_digest).
Bodies are read up to a limit, whatever Content-Length claims (a chunked body has none).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from ..errors import AuthenticationError, InvalidInputError, RequestTooLargeError

MIB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `max_body`: bytes of the request body;
    `max_image_pixels`: width x height of an image in it, checked from its header before its
    pixels are decoded; `max_steps` and `max_images`: per request (the memory planner bounds
    sizes and the number of images further, per model)."""

    max_body: int = 16 * MIB
    max_image_pixels: int = 4096 * 4096
    max_steps: int = 150
    max_images: int = 8


@dataclass(frozen=True)
class Credentials:
    """The accepted credentials; none at all means every request is let in."""

    api_key: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def required(self) -> bool:
        return bool(self.api_key or self.password)

    def check(self, headers: Mapping[str, str]) -> None:
        """AuthenticationError unless the Authorization header carries accepted credentials."""
        if not self.required:
            return
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        ok = False
        if scheme == "bearer" and self.api_key:
            ok = _same(value, self.api_key)
        elif scheme == "basic":
            user, password = _basic(value)
            if self.api_key:
                ok = _same(password, self.api_key)
            if self.password and not ok:
                ok = _same(user, self.user or "") & _same(password, self.password)
        if not ok:
            ways = []
            if self.api_key:
                ways.append("the API key as 'Authorization: Bearer KEY' or as basic auth's "
                            "password")
            if self.password:
                ways.append("basic auth with the user and password of --api-auth")
            raise AuthenticationError("missing or wrong credentials: send " +
                                      " or ".join(ways))


def credentials_from(api_key: str | None, api_key_file: str | None,
                     api_auth: str | None) -> Credentials:
    """The server's credentials from its flags (`--api-key`, `--api-key-file`,
    `--api-auth USER:PASS`); InvalidInputError for an empty key or a malformed pair."""
    if api_key is not None and api_key_file is not None:
        raise InvalidInputError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read --api-key-file {api_key_file!r}: {exc}") \
                from exc
    if api_key is not None and not api_key.strip():
        raise InvalidInputError("the API key is empty; give a non-empty one (e.g. `openssl "
                                "rand -hex 16`)")
    user = password = None
    if api_auth is not None:
        user, sep, password = api_auth.partition(":")
        if not sep or not user or not password:
            raise InvalidInputError("--api-auth must be USER:PASS, both non-empty")
    return Credentials(api_key, user, password)


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


async def read_body(headers: Mapping[str, str], receive: Callable[[], Awaitable[dict]],
                    limit: int) -> bytes:
    """The request body, at most `limit` bytes (RequestTooLargeError as soon as it is
    known to be over: from Content-Length, or while reading)."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInputError(f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise RequestTooLargeError(_too_large(limit))
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(_too_large(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return (f"the request body is over this server's limit of {limit / MIB:.1f} MiB "
            "(edge-sdk serve --max-body-mb)")


def _basic(value: str) -> tuple[str, str]:
    try:
        user, _, password = base64.b64decode(value, validate=True).decode("utf-8") \
            .partition(":")
    except (binascii.Error, ValueError):
        return "", ""
    return user, password


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
