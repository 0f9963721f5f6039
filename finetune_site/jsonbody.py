"""Reading a JSON request body into plain, valid Python values, or saying exactly why not.

Python's json accepts two things the rest of the stack cannot take: lone UTF-16
surrogates written as escapes ("\\ud800"), which no database, tokenizer or
renderer can encode, and nesting deep enough to exhaust the recursion limit.
Both become a ValueError with a message fit for the client.
"""

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


def check_text(value, raw: str | bytes | None = None) -> None:
    """Raise ValueError naming where value holds a string that is not valid Unicode.

    With raw, the UTF-8 text value was parsed from, the walk runs only when raw has
    a surrogate escape at all.
    """
    pattern = _SURROGATE_ESCAPE_BYTES if isinstance(raw, (bytes, bytearray)) else _SURROGATE_ESCAPE
    if raw is not None and not pattern.search(raw):
        return  # the cheap, usual case: no escape could have made one
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
