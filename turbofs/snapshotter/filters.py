"""containerd's filter syntax, for ``List`` (``ctr snapshots ls`` and containerd's own walks).

``selector[,selector...]`` must all match; several filters match if any does. A selector is
``fieldpath [op value]``, ``op`` one of ``==``, ``!=``, ``~=`` (regexp); without one the field
must be present and non-empty. Values are Go-quoted strings or runs without spaces and
commas. Snapshot fields: ``name``, ``parent``, ``kind``, ``labels.KEY``; e.g.::

    labels."containerd.io/snapshot.ref"==sha256:ab...,parent=="default/3/sha256:cd..."
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from turbofs.core.errors import UsageError

_OPERATORS: Final = ("==", "!=", "~=")
_ESCAPES: Final = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}
_WORD: Final = re.compile(r"[A-Za-z0-9_]+")

#: The value of a field path of one object, or None when the object lacks it.
Adaptor = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        have = adaptor(self.path)
        if self.op is None:
            return bool(have)
        if self.op == "==":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        if have is None:
            return False
        return re.search(self.value, have) is not None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> UsageError:
        return UsageError(f"filter {self.text!r}: {why} at position {self.pos}")

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\" and quote != "`":
                if self.pos >= len(self.text):
                    break
                e = self.text[self.pos]
                self.pos += 1
                if e not in _ESCAPES:
                    raise self.fail(f"unknown escape \\{e}")
                out.append(_ESCAPES[e])
                continue
            out.append(c)
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'`":
            return self.quoted()
        m = _WORD.match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'`":
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t\n":
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a value")
        return self.text[start : self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while self.pos < len(self.text) and self.text[self.pos] == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_spaces()
        for op in _OPERATORS:
            if self.text.startswith(op, self.pos):
                self.pos += len(op)
                value = self.value()
                if op == "~=":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise self.fail(f"bad regular expression {value!r} ({exc})") from None
                return Selector(tuple(path), op, value)
        return Selector(tuple(path))

    def parse(self) -> list[Selector]:
        out = [self.selector()]
        self.skip_spaces()
        while self.pos < len(self.text):
            if self.text[self.pos] != ",":
                raise self.fail("expected ',' between selectors")
            self.pos += 1
            out.append(self.selector())
            self.skip_spaces()
        return out


def parse(filters: Sequence[str]) -> list[list[Selector]]:
    """Parse filters (OR of ANDs); an empty list matches everything. Raises UsageError."""
    return [_Parser(f).parse() for f in filters if f.strip()]


def match(parsed: Sequence[Sequence[Selector]], adaptor: Adaptor) -> bool:
    if not parsed:
        return True
    return any(all(s.match(adaptor) for s in conj) for conj in parsed)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """The fields of a snapshot, as containerd names them."""

    def get(path: Sequence[str]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "kind":
            return kind
        if head == "labels" and len(path) > 1:
            return labels.get(".".join(path[1:]))
        return None

    return get


__all__ = ["Selector", "match", "parse", "snapshot_adaptor"]
