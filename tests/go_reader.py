"""A small reader that binds a JSON request body the way Ollama does: Go's `encoding/json` decoding into a
struct, through gin's `ShouldBindJSON`.

Written independently of the gateway's own reader (`upstream.go_json`), from Go's rules, so the fake Ollama
can run the model Ollama would run, and tests can compare the two readers:
- `json.NewDecoder(body).Decode(&req)` reads the first JSON value and ignores what follows;
- invalid UTF-8 and lone surrogate escapes become U+FFFD;
- keys match a field's tag exactly, or else by `foldName` (ASCII letters upper-cased, other runes replaced by
  the smallest rune of their `unicode.SimpleFold` orbit);
- members are applied in order, so the last one wins; `null` leaves a string as it was and sets a slice, map,
  pointer or interface to nil;
- a value of the wrong type is skipped and reported once the whole object is read (gin then answers 400).
"""

import json
import re
from collections.abc import Mapping
from typing import Any

STRING = "string"  # a Go string: null leaves it untouched
ANY = "any"  # a slice, map, pointer or interface: null sets it to nil

# unicode.SimpleFold where Go's tables (caseOrbit) say more than "the other case" (unicode/tables.go): the
# orbits k -> K (Kelvin sign) -> K and s -> long s -> S, and the Turkish i's, which fold only to themselves.
_CASE_ORBIT = {
    "K": "k",
    "S": "s",
    "k": "\u212a",
    "s": "\u017f",
    "\u212a": "K",
    "\u017f": "S",
    "\u0130": "\u0130",
    "\u0131": "\u0131",
}
_SURROGATE = re.compile("[\ud800-\udfff]")


class GoBindError(ValueError):
    """What gin's ShouldBindJSON returns; Ollama answers it with 400 and this message."""


def simple_fold(char: str) -> str:
    """unicode.SimpleFold: the next rune of the orbit (Python's case mappings stand in for Go's tables)."""
    if char in _CASE_ORBIT:
        return _CASE_ORBIT[char]
    lower, upper = char.lower(), char.upper()
    if len(lower) == 1 and lower != char:
        return lower
    if len(upper) == 1 and upper != char:
        return upper
    return char


def fold_rune(char: str) -> str:
    """encoding/json's foldRune: the smallest rune of the orbit, found by walking it upwards."""
    while True:
        following = simple_fold(char)
        if following <= char:
            return following
        char = following


def fold_name(key: str) -> str:
    return "".join(
        (char.upper() if "a" <= char <= "z" else char) if char < "\x80" else fold_rune(char) for char in key
    )


def _go_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, Pairs):  # before list: Pairs is one
        return Pairs((_go_strings(key), _go_strings(item)) for key, item in value)
    if isinstance(value, list):
        return [_go_strings(item) for item in value]
    return value


class Pairs(list):
    """A JSON object as its members, in order, duplicates kept (what Go's decoder walks)."""


def _refuse_constant(name: str) -> Any:
    raise GoBindError(f"invalid character '{name[0]}' looking for beginning of value")


def decode_first_value(raw: bytes) -> Any:
    """The body's first JSON value, objects as `Pairs`, strings as Go has them."""
    text = raw.decode("utf-8", errors="replace").lstrip(" \t\n\r")
    if not text:
        raise GoBindError("missing request body")
    decoder = json.JSONDecoder(object_pairs_hook=Pairs, parse_constant=_refuse_constant)
    try:
        value, _ = decoder.raw_decode(text)
    except json.JSONDecodeError as error:
        raise GoBindError(f"invalid JSON: {error.msg}") from None
    return _go_strings(value)


def bind(raw: bytes, fields: Mapping[str, str], struct: str = "api.Request") -> dict[str, Any]:
    """The fields of `struct` (tag -> STRING or ANY) that the body sets, as Go binds them."""
    value = decode_first_value(raw)
    if value is None:
        return {}  # null into a struct: nothing happens
    if not isinstance(value, Pairs):
        raise GoBindError(f"json: cannot unmarshal {type(value).__name__} into Go value of type {struct}")
    by_fold = {fold_name(tag): tag for tag in fields}
    bound: dict[str, Any] = {}
    errors: list[str] = []
    for key, item in value:
        tag = key if key in fields else by_fold.get(fold_name(key))
        if tag is None:
            continue
        if fields[tag] == STRING:
            if item is None:
                continue
            if not isinstance(item, str):
                errors.append(f"json: cannot unmarshal into Go struct field {struct}.{tag} of type string")
                continue
        bound[tag] = _plain(item)
    if errors:
        raise GoBindError(errors[0])
    return bound


def _plain(value: Any) -> Any:
    """Nested objects as dicts (the last duplicate wins there too), for code that reads them."""
    if isinstance(value, Pairs):
        return {key: _plain(item) for key, item in value}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


# unicode.IsSpace, which strings.TrimSpace (and so Ollama's model reference parser) trims.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)


def trim_space(text: str) -> str:
    return text.strip(GO_SPACE)
