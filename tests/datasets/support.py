"""Small builders shared by the dataset tests: JSON lines, examples and image bytes."""

import base64
import io
import json
import struct
import zlib

from datasets_app.validation import validate_stream


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def jsonl(*objects) -> bytes:
    return b"".join(line(obj) for obj in objects)


def validate(data: bytes, **options):
    """Validate data and return (report, the normalized lines written out)."""
    out = io.BytesIO()
    report = validate_stream(io.BytesIO(data), out=out, **options)
    return report, [json.loads(text) for text in out.getvalue().splitlines()]


def only_error(report):
    assert len(report.errors) == 1, [str(issue) for issue in report.errors]
    return report.errors[0]


def chat(*turns, system: str | None = "You are terse.") -> dict:
    """A chat example from alternating user/assistant texts."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages}


def weather_call(call_id: str = "call_1", arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def function_calling_example(**overrides) -> dict:
    example = {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [weather_call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 C in Paris."},
        ],
    }
    example.update(overrides)
    return example


def image_question(url: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def png_bytes(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4)) + chunk(b"IEND", b"")
    )


def gif_bytes(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00;"


def bmp_bytes(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHH", 40, width, -height, 1, 24) + b"\x00" * 24
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def jpeg_bytes(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    scan = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00" + b"\x12\xff\x00\x34"
    return b"\xff\xd8" + app0 + sof0 + scan + b"\xff\xd9"


def webp_bytes(width: int, height: int, chunk: bytes = b"VP8X") -> bytes:
    if chunk == b"VP8X":
        body = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif chunk == b"VP8L":
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little")
    else:
        body = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    riff = b"WEBP" + chunk + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(riff)) + riff
