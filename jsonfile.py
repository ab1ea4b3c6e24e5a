"""JSON the project does not trust: the files and lines users hand it (checkpoint configs, adapter
and tokenizer files, shard metadata, data records), parsed with a bounded nesting depth and read
field by field with the type each use needs.

Every failure is one line naming the file (and line) and the key, raised as the caller's own error
class (CheckpointError, AdapterError, TokenizerError, ShardError, PrepareError, ...; JSONError by
default), each a ValueError, which cli.py prints as one line with exit status 1. Plain standard
library: data/prepare.py imports it and must not import torch.

Read top to bottom:
  MAX_DEPTH      how deeply a document may nest
  loads, load    a string / a file parsed, its depth checked (load: its top-level type too)
  field          obj[key] of an expected type, absent or null -> a default where one is given
  expect         any value of an expected type (int never a bool; float finite; positive if asked)
"""

import json

# Every file the project reads nests under 10 levels; 64 leaves room for any honest one. Python's
# parser recurses once per level and fails at about 1000 (RecursionError); the code that walks a
# parsed document (repr, json.dump of a record into results) recurses too.
MAX_DEPTH = 64


class JSONError(ValueError):
    """JSON that cannot be used: one line naming the file (and line) and the key."""


def loads(text, where, error=JSONError, bad="not JSON"):
    """text (str or bytes) parsed, or error(f"{where}: ...") when it is not JSON (bad: the words the
    caller's messages use for that) or nests deeper than MAX_DEPTH. where: the file, or FILE:LINE."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: {bad} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # bytes that are not UTF-8, an integer of over 4300 digits
        raise error(f"{where}: {bad} ({_first_line(e)})") from None
    # Counting brackets (strings included) is a C-speed bound: a document with no more of them than
    # MAX_DEPTH cannot nest deeper, and only other documents are walked.
    opening = (b"[", b"{") if isinstance(text, (bytes, bytearray)) else ("[", "{")
    if text.count(opening[0]) + text.count(opening[1]) > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return value


def load(path, error=JSONError, bad="not JSON", expected=dict):
    """The JSON file at path parsed (loads), its top level of expected (None: any): error naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    value = loads(text, path, error, bad)
    if expected is not None and not _is(value, expected):
        raise error(f"{path}: {_name(expected)} expected at the top level, got {_json_type(value)}")
    return value


REQUIRED = object()  # field's default when the key must be there


def field(obj, key, expected, where, error=JSONError, default=REQUIRED, positive=False):
    """obj[key] (obj: a dict read from where) checked by expect; an absent key (or a null, where
    a default is given) is default, or error(f"{where}: {key} is missing")."""
    value = obj.get(key)
    if value is None:
        if default is not REQUIRED:
            return default
        if key not in obj:
            raise error(f"{where}: {key} is missing")
    return expect(value, expected, f"{where}: {key}", error, positive)


def expect(value, expected, what, error=JSONError, positive=False):
    """value if it is of expected (int, float, bool, str, list or dict; a tuple of them: any), else
    error(f"{what} is {value!r}, not ..."). JSON's true is no number; an int is a fine float (and
    comes back as one); a float must be finite. positive: a number must also be above 0."""
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = any(_is(value, k) for k in types)
    if ok and positive and not isinstance(value, bool) and isinstance(value, (int, float)):
        ok = value > 0
    if not ok:
        wanted = " or ".join(_name(k) for k in types)
        if positive:
            wanted = wanted.replace("an integer", "a positive integer").replace("a finite number", "a positive number")
        raise error(f"{what} is {_short(value)}, not {wanted}")
    return float(value) if types == (float,) else value


def _is(value, expected):
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) != float("inf") \
            and value == value  # NaN is the one value unequal to itself
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
          list: "a list", dict: "an object"}


def _name(expected):
    return _NAMES.get(expected, getattr(expected, "__name__", str(expected)))


def _json_type(value):
    """What a parsed value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def _short(value, limit=60):
    """repr of value, cut to limit characters: a message stays one readable line."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _deeper_than(value, limit):
    """Whether value's lists and objects nest more than limit levels: walked a level at a time,
    without recursion (a 9 MB tokenizer.json takes a quarter of a second)."""
    level, depth = [value] if isinstance(value, (dict, list)) else [], 1  # the containers at depth
    while level:
        if depth > limit:
            return True
        below = []
        for node in level:
            below += node.values() if type(node) is dict else node
        level = [node for node in below if type(node) is dict or type(node) is list]
        depth += 1
    return False
