"""Reading a JSON request body into plain, valid Python values, or saying exactly why not.

Python's json accepts two things the rest of the stack cannot take: lone UTF-16
surrogates written as escapes ("\\ud800"), which no database, tokenizer or
renderer can encode, and nesting deep enough to exhaust the recursion limit.
Both become a ValueError with a message fit for the client.
"""

import asyncio
import json
import re

# A surrogate can only reach a parsed string through a \\uD800-\\uDFFF escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_ESCAPE_BYTES = re.compile(_SURROGATE_ESCAPE.pattern.encode())


def loads(raw: bytes | str):
    """json.loads of UTF-8 text, but a ValueError (not RecursionError) for deep nesting and lone surrogates.

    Bytes are decoded strictly first: json.loads(bytes) would also take UTF-16 and
    UTF-32, and lets UTF-8-encoded surrogates through.
    """
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as problem:
            raise ValueError(f"the body is not valid UTF-8 (byte {problem.start + 1})") from None
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    check_text(value, raw)
    return value


LOOP_SAFE_BYTES = 64 * 1024
"""Bodies up to this size parse in well under a millisecond; larger ones parse in a thread."""


async def aloads(raw: bytes | str):
    """loads() for async views: a large body is parsed in a worker thread, so the event loop never waits on it."""
    if len(raw) <= LOOP_SAFE_BYTES:
        return loads(raw)
    return await asyncio.to_thread(loads, raw)


def check_text(value, raw: str | bytes | None = None) -> None:
    """Raise ValueError naming where value holds a string that is not valid Unicode.

    With raw, the UTF-8 text value was parsed from, nothing runs when raw has no
    surrogate escape at all. Otherwise one encoding of the whole value (C speed)
    finds out whether a lone surrogate is there; only then is it walked to name
    where. A valid pair (an escaped emoji) costs the encoding, never the walk.
    """
    pattern = _SURROGATE_ESCAPE_BYTES if isinstance(raw, (bytes, bytearray)) else _SURROGATE_ESCAPE
    if raw is not None and not pattern.search(raw):
        return  # the cheap, usual case: no escape could have made one
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # a lone surrogate (UnicodeEncodeError), or a value too odd to dump
        _name_the_lone_surrogate(value)


def _name_the_lone_surrogate(value) -> None:
    stack = [(value, "")]
    while stack:  # iterative: the value may be as deep as the parser allowed
        item, path = stack.pop()
        if isinstance(item, str):
            _check_string(item, path or "the body")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, f"a key in {path or 'the body'}")
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))


def _check_string(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as problem:
        code = ord(text[problem.start])
        raise ValueError(
            f"{where} holds a lone UTF-16 surrogate (\\u{code:04x}), which is not a character; "
            "send valid Unicode (a surrogate pair stands for one character)"
        ) from None
