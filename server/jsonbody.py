"""JSON from outside (request bodies, manifests), parsed with a bound on nesting depth.

``json.loads`` recurses once per nesting level: a body of a few thousand ``[`` raises
RecursionError, and documents just under the interpreter's limit make later recursive code
(``json.dumps``) fail instead. :func:`loads` checks the depth first, without recursion, and
refuses anything deeper than REGISTRY_MAX_JSON_DEPTH with a :class:`JsonError`; input the
parser would recurse on too deeply anyway is caught as well. Integers of more than
REGISTRY_MAX_JSON_INT_DIGITS digits (Python refuses past 4300 with a plain ValueError), NaN,
Infinity, numbers that overflow to infinity and text that is not UTF-8 are refused the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Final

from turbofs.core.config import REGISTRY_MAX_JSON_DEPTH, REGISTRY_MAX_JSON_INT_DIGITS

_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST_RE: Final = re.compile(rb"\[\]|\{\}")


class JsonError(ValueError):
    """Not JSON, or nested deeper than allowed (the message says which)."""


def too_deep(data: bytes, max_depth: int) -> bool:
    """Whether ``data`` nests arrays and objects deeper than ``max_depth`` (brackets inside
    strings do not count). Each pass removes the innermost empty pairs, one level, in C;
    unbalanced brackets stop the passes early and are left to the parser, which refuses them."""
    raw = data.translate(None, _NOT_BRACKETS)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:  # strings only add brackets
        return False
    # escapes gone, every quote left delimits a string: the even pieces are outside strings
    flat = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(flat.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        reduced = _INNERMOST_RE.sub(b"", brackets)
        if len(reduced) == len(brackets):
            return False  # unbalanced: not JSON
        brackets = reduced
    return bool(brackets)


def _int(max_digits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        digits = len(text) - text.startswith("-")
        if digits > max_digits:
            raise JsonError(f"an integer of {digits} digits is longer than the limit of {max_digits}")
        return int(text)

    return parse


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"number {text[:40]!r} is out of range")
    return value


def _constant(name: str) -> Any:
    raise JsonError(f"{name} is not JSON")


def loads(
    data: bytes,
    what: str,
    max_depth: int = REGISTRY_MAX_JSON_DEPTH,
    max_int_digits: int = REGISTRY_MAX_JSON_INT_DIGITS,
) -> Any:
    """``data`` parsed as JSON; JsonError naming ``what`` if it is not UTF-8 JSON, too deep,
    or holds an integer too long, NaN or Infinity."""
    if too_deep(data, max_depth):
        raise JsonError(f"{what} is nested more than {max_depth} levels deep")
    try:
        # UTF-8 only (RFC 8259 8.1): json.loads of bytes would also take UTF-16 and UTF-32
        return json.loads(data.decode("utf-8"), parse_int=_int(max_int_digits), parse_float=_float,
                          parse_constant=_constant)
    except JsonError as exc:
        raise JsonError(f"{what} is not acceptable JSON: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:  # only with a max_depth above the interpreter's limit
        raise JsonError(f"{what} is nested too deeply") from None
