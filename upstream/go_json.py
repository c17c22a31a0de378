"""Reading the fields of a request body that the gateway decides on, exactly as Ollama (Go) will read them.

The gateway forwards the client's bytes unchanged, so whatever it decides on (the model, for the policy) must
be what Ollama itself will read from those bytes. Ollama binds JSON with Go's `encoding/json` (gin's
`ShouldBindJSON`), which reads an object differently from Python's `json`:

- keys match struct fields case-insensitively, with Unicode simple folding: `Model`, `MODEL`, and `"\\u212a"`
  (the Kelvin sign) for a `k` or `"\\u017f"` (long s) for an `s`, all name the same field;
- when a field is given more than once, the last one wins, except that `null` leaves a string untouched;
- lone surrogates (`"\\ud800"`) and invalid UTF-8 become U+FFFD;
- only the body's first JSON value is read; whatever follows is ignored.

And Ollama reads some bodies twice, two ways: on `/v1`, its cloud pass-through (`server/cloud_proxy.go`) looks
the exact key `model` up in a map before the handler binds the struct case-insensitively, so within Ollama
itself `{"model": "a", "Model": "b"}` names two different models.

What this module does, and why: it reads the fields with Go's rules, *and* it refuses (400) any body in which
a field the gateway decides on appears more than once, or spelt in any way other than its own name. Reading
with Go's rules alone would decide correctly for today's Ollama build; refusing the ambiguous spellings too
means the decision holds for every reader the body may meet (Ollama's two, a JSON library gin is built with,
a proxy that inspects the body), and costs nothing: no client sends a field twice or as `MODEL`.

Both ways of reading a body yield its top-level members to the same decision: a body up to 64 KiB is parsed
whole by Python's C parser (microseconds, and bounded by the size); a larger one is walked on its raw bytes,
top level only: nested values are skipped (strings precisely, containers by bracket depth) without being
built, so it costs no memory, and a body of millions of tiny values is refused once it has cost `MAX_VALUES`
steps (Ollama would still parse it in full). Its nested values are not validated: Go validates the whole
body before binding any of it, and answers invalid JSON with its own 400.
"""

import functools
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from enum import Enum
from typing import Any

# Code points Go's `foldName` turns into an ASCII letter (unicode.SimpleFold orbits of `k` and `s`); the
# dotless i is listed too, though current Go keeps it apart from `i`: refusing one key too many is harmless.
_NON_ASCII_FOLDS = {"\u017f": "S", "\u212a": "K", "\u0131": "I"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_WHITESPACE_BYTES = frozenset((b" ", b"\t", b"\n", b"\r"))
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_STRUCTURAL = re.compile(rb'["\[\]{}]')
_OPENING, _QUOTE, _BACKSLASH = frozenset(b"[{"), ord('"'), ord("\\")

# Bodies up to this size are parsed whole by Python's C parser: fast, and bounded by the size. Larger ones
# (base64 images, mostly) are walked at the top level without being built.
PARSE_WHOLE_LIMIT = 64 * 1024

# Skipping steps (strings, brackets, escapes) allowed in one large body. A chat with long conversations,
# tools and images takes a few thousand; an embedding batch of a million short inputs about a million.
MAX_VALUES = 2_000_000


class BodyRefused(ValueError):
    """The body can't be read the way Ollama would read it, or could be read in more than one way."""


def go_fold(key: str) -> str:
    """A key as Go's `encoding/json` compares it to a field name, for the field names of Ollama's structs
    (which are all ASCII): ASCII letters upper-cased, the non-ASCII runes that fold onto them replaced."""
    if key.isascii():
        return key.upper()
    return "".join(
        (char.upper() if "a" <= char <= "z" else char) if char < "\x80" else _NON_ASCII_FOLDS.get(char, char)
        for char in key
    )


def go_string(value: str) -> str:
    """A decoded JSON string as Go has it: lone surrogates are U+FFFD (Python keeps them)."""
    return value if value.isascii() else _SURROGATE.sub("\ufffd", value)


class Kind(Enum):
    """What else than a string a field the gateway decides on may hold (null counts as absent)."""

    ARRAY = "array"
    OBJECT = "object"
    OTHER = "other"  # a number, true or false


# A string as Go holds it, true or false as a bool, anything else by its kind.
FieldValue = str | bool | Kind


class GoFields:
    """The fields of one body the gateway decides on: each one's value, if given and not null (a string as
    Go holds it, anything else by its kind).

    Given once and spelt exactly (anything else was refused), a null is the same as absent for every Go type:
    it leaves a string as it was (empty) and sets a slice, map or pointer to nil."""

    def __init__(self, values: dict[str, FieldValue], objects: dict[str, Any] | None = None) -> None:
        self._values = values
        self._objects = objects or {}  # an object field's value: parsed (small bodies) or its raw bytes

    def string(self, name: str) -> str:
        """The field as Go's `string` holds it; "" when absent or null (Go's zero value)."""
        value = self._values.get(name, "")
        if not isinstance(value, str):
            raise BodyRefused(f"'{name}' must be a string")
        return value

    def is_array(self, name: str) -> bool:
        return self._values.get(name) is Kind.ARRAY

    def flag(self, name: str, default: bool = False) -> bool:
        """The field as Go's `bool` holds it (`default` when absent or null)."""
        value = self._values.get(name, default)
        if not isinstance(value, bool):
            raise BodyRefused(f"'{name}' must be true or false")
        return value

    def member_flag(self, name: str, member: str) -> bool:
        """A bool inside an object field (`stream_options.include_usage`), as Go binds it into its struct:
        the member's key matched without regard to case, the last one given winning, null leaving it false."""
        raw = self._objects.get(name)
        if raw is None:
            return False
        if isinstance(raw, bytes):
            if len(raw) > PARSE_WHOLE_LIMIT:
                raise BodyRefused(f"'{name}' is too large")
            try:
                raw = _DECODER.decode(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                raise BodyRefused("the request body is not valid JSON") from None
        wanted, value = go_fold(member), False
        for key, item in raw:
            if go_fold(go_string(key)) != wanted or item is None:
                continue
            if not isinstance(item, bool):
                raise BodyRefused(f"'{name}.{member}' must be true or false")
            value = item
        return value


def read_fields(body: bytes, names: Collection[str]) -> GoFields:
    """The top-level fields `names` of a JSON object body, as Go would bind them. Raises BodyRefused when the
    body is not one JSON object, or names one of these fields twice or in another spelling."""
    wanted = _folded(tuple(names))
    members: Iterable[tuple[str, Any]]
    value_of: Callable[[Any], FieldValue | None]
    if len(body) <= PARSE_WHOLE_LIMIT:
        members, value_of = _parsed_members(body), _value_of_parsed
    else:
        members, value_of = _TopLevelReader(body).members(), _value_of_raw
    found: dict[str, FieldValue] = {}
    objects: dict[str, Any] = {}
    seen: set[str] = set()
    for key, payload in members:
        name = wanted.get(go_fold(key))
        if name is None:
            continue
        if key != name:
            raise BodyRefused(f"the field '{name}' must be spelt exactly '{name}' (got '{key}')")
        if name in seen:
            raise BodyRefused(f"the field '{name}' is given more than once")
        seen.add(name)
        value = value_of(payload)
        if value is not None:
            found[name] = value
        if value is Kind.OBJECT:
            objects[name] = payload
    return GoFields(found, objects)


# -- small bodies: parsed whole by Python's C parser ------------------------------------------------------


class _Object(list[tuple[str, Any]]):
    """A JSON object as its members, in order, duplicates kept (what Go's decoder walks)."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's parser takes NaN and Infinity; Go's does not


_DECODER = json.JSONDecoder(object_pairs_hook=_Object, parse_constant=_refuse_constant)


def _parsed_members(body: bytes) -> list[tuple[str, Any]]:
    try:
        # Strictly UTF-8 (no byte-order mark, no UTF-16), one value with only whitespace around it.
        parsed = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BodyRefused("the request body is not valid JSON") from None
    if not isinstance(parsed, _Object):
        raise BodyRefused("the request body must be a JSON object")
    return [(go_string(key), item) for key, item in parsed]


def _value_of_parsed(item: Any) -> FieldValue | None:
    if item is None:
        return None
    if isinstance(item, str):
        return go_string(item)
    if isinstance(item, bool):
        return item
    if isinstance(item, _Object):
        return Kind.OBJECT
    return Kind.ARRAY if isinstance(item, list) else Kind.OTHER


# -- large bodies: walked at the top level, nothing built -------------------------------------------------


def _value_of_raw(raw: bytes) -> FieldValue | None:
    if raw == b"null":
        return None
    if raw.startswith(b'"'):
        return _decoded_string(raw, "a field the gateway reads")
    if raw in (b"true", b"false"):
        return raw == b"true"
    return {b"[": Kind.ARRAY, b"{": Kind.OBJECT}.get(raw[:1], Kind.OTHER)


def _decoded_string(raw: bytes, what: str) -> str:
    """A JSON string's raw bytes, quotes included, decoded as Go has it."""
    try:
        return go_string(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        raise BodyRefused(f"the request body is not valid JSON ({what} is not a valid string)") from None


@functools.cache
def _folded(names: tuple[str, ...]) -> dict[str, str]:
    assert all(name.isascii() for name in names), "Ollama's JSON field names are ASCII"
    return {go_fold(name): name for name in names}


class _TopLevelReader:
    """Walks the members of a JSON object body, returning each key with its value's raw bytes."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0
        self.steps = 0

    def members(self) -> Iterator[tuple[str, bytes]]:
        body = self.body
        self._skip_whitespace()
        if not body.startswith(b"{", self.pos):
            raise BodyRefused("the request body must be a JSON object")
        self.pos += 1
        self._skip_whitespace()
        if body.startswith(b"}", self.pos):
            self.pos += 1
        else:
            while True:
                if not body.startswith(b'"', self.pos):
                    raise BodyRefused("the request body is not valid JSON (expected a key)")
                key_end = self._string_end(self.pos + 1)
                key = self._key(body[self.pos : key_end])
                self.pos = key_end
                self._skip_whitespace()
                if not body.startswith(b":", self.pos):
                    raise BodyRefused("the request body is not valid JSON (expected ':')")
                self.pos += 1
                self._skip_whitespace()
                start = self.pos
                self._skip_value()
                yield key, body[start : self.pos]
                self._skip_whitespace()
                if body.startswith(b",", self.pos):
                    self.pos += 1
                    self._skip_whitespace()
                elif body.startswith(b"}", self.pos):
                    self.pos += 1
                    break
                else:
                    raise BodyRefused("the request body is not valid JSON (expected ',' or '}')")
        self._skip_whitespace()
        if self.pos != len(body):
            # Go reads the first value and ignores the rest; a body that is more than one value is refused.
            raise BodyRefused("the request body must be one JSON object, with nothing after it")

    @staticmethod
    def _key(raw: bytes) -> str:
        if b"\\" not in raw and raw.isascii():
            return raw[1:-1].decode("ascii")  # the common case, without a JSON parse
        return _decoded_string(raw, "a key")

    def _skip_whitespace(self) -> None:
        if self.body[self.pos : self.pos + 1] in _WHITESPACE_BYTES:
            match = _WHITESPACE.match(self.body, self.pos)
            self.pos = match.end() if match else self.pos

    def _count_step(self) -> None:
        self.steps += 1
        if self.steps > MAX_VALUES:
            raise BodyRefused(f"the request body holds too many JSON values (more than {MAX_VALUES:,})")

    def _string_end(self, pos: int) -> int:
        """The position after the closing quote of the string whose contents start at `pos`."""
        body = self.body
        while True:
            self._count_step()
            quote = body.find(b'"', pos)
            if quote < 0:
                raise BodyRefused("the request body is not valid JSON (a string is not closed)")
            escapes = quote
            while escapes > pos and body[escapes - 1] == _BACKSLASH:
                escapes -= 1
                self._count_step()
            if (quote - escapes) % 2 == 0:  # the quote itself is not escaped
                return quote + 1
            pos = quote + 1

    def _skip_value(self) -> None:
        body, pos = self.body, self.pos
        if pos >= len(body):
            raise BodyRefused("the request body is not valid JSON (a value is missing)")
        first = body[pos]
        if first == _QUOTE:
            self.pos = self._string_end(pos + 1)
        elif first in _OPENING:
            self.pos = self._container_end(pos + 1)
        else:
            match = _SCALAR.match(body, pos)
            if match is None:
                raise BodyRefused("the request body is not valid JSON (a value is not valid)")
            self.pos = match.end()

    def _container_end(self, pos: int) -> int:
        """The position after the bracket closing the container whose contents start at `pos`."""
        body, depth = self.body, 1
        while True:
            self._count_step()
            match = _STRUCTURAL.search(body, pos)
            if match is None:
                raise BodyRefused("the request body is not valid JSON (a bracket is not closed)")
            char = body[match.start()]
            if char == _QUOTE:
                pos = self._string_end(match.end())
                continue
            depth += 1 if char in _OPENING else -1
            pos = match.end()
            if depth == 0:
                return pos
