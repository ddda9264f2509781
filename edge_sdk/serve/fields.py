"""Typed reading of a request's fields: each wrong type or range is an InvalidInputError
naming the field, so a client learns which of its fields to fix.

Multipart forms (OpenAI's edits) carry every value as text: `text=True` reads numbers and
booleans from their spelling there.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from ..errors import InvalidInputError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
SHOWN = 40  # characters of a wrong value quoted in its error


def _missing(body: Mapping[str, Any], name: str) -> bool:
    return body.get(name) is None


def get_str(body: Mapping[str, Any], name: str, default: str | None = None,
            max_len: int = 100_000) -> str | None:
    if _missing(body, name):
        return default
    value = body[name]
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {_kind(value)}")
    if len(value) > max_len:
        raise InvalidInputError(f"{name} is {len(value):,} characters; at most {max_len:,}")
    return value


def get_int(body: Mapping[str, Any], name: str, default: int | None = None, *,
            lo: int | None = None, hi: int | None = None, text: bool = False) -> int | None:
    if _missing(body, name):
        return default
    value = body[name]
    if text and isinstance(value, str):
        value = _parsed(value, int, name, "a whole number")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be a whole number, got {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidInputError(f"{name}={value} is out of range: {_range(lo, hi)}")
    return value


def get_float(body: Mapping[str, Any], name: str, default: float | None = None, *,
              lo: float | None = None, hi: float | None = None,
              text: bool = False) -> float | None:
    if _missing(body, name):
        return default
    value = body[name]
    if text and isinstance(value, str):
        value = _parsed(value, float, name, "a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {_kind(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidInputError(f"{name}={value} is out of range: {_range(lo, hi)}")
    return float(value)


def get_bool(body: Mapping[str, Any], name: str, default: bool = False, *,
             text: bool = False) -> bool:
    if _missing(body, name):
        return default
    value = body[name]
    if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)  # A1111's inpainting_mask_invert is 0 or 1
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be true or false, got {_kind(value)}")
    return value


def get_dict(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    if _missing(body, name):
        return {}
    value = body[name]
    if not isinstance(value, dict):
        raise InvalidInputError(f"{name} must be an object, got {_kind(value)}")
    return value


def get_list(body: Mapping[str, Any], name: str) -> list[Any]:
    if _missing(body, name):
        return []
    value = body[name]
    if not isinstance(value, list):
        raise InvalidInputError(f"{name} must be a list, got {_kind(value)}")
    return value


def _parsed(text: str, parse: Callable[[str], Any], name: str, what: str) -> Any:
    """A form field's text read as a number."""
    try:
        return parse(text.strip())
    except ValueError:
        raise InvalidInputError(f"{name} must be {what}, got {text[:SHOWN]!r}") from None


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:SHOWN]}{'...' if len(shown) > SHOWN else ''}"


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
