"""Check the images inside examples: web addresses and inline base64 data URLs.

Pillow is not needed: an image is recognised by its first bytes, its size read
from the header and its end found where the format puts it, which is all
validation wants and far cheaper than decoding pixels. A file cut short (the
usual damage: an interrupted download or copy) is caught; pixels damaged in the
middle of a complete file are not.
"""

import base64
import binascii
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 16384
"""Wider or taller than this is no photo or drawing a vision model takes; most likely a broken header."""
IMAGE_KINDS = ("jpeg", "png", "gif", "webp", "bmp")
_DECLARED_KINDS = {
    "jpeg": "jpeg",
    "jpg": "jpeg",
    "pjpeg": "jpeg",
    "png": "png",
    "gif": "gif",
    "webp": "webp",
    "bmp": "bmp",
    "x-ms-bmp": "bmp",
}
"""The subtype of "data:image/<subtype>" each image kind may be declared as."""


@dataclass(frozen=True)
class ImageInfo:
    kind: str
    width: int | None
    height: int | None
    size: int


def sniff_image_kind(data: bytes) -> str | None:
    """Return "jpeg", "png", "gif", "webp" or "bmp" from the first bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    return None


def read_image_info(data: bytes) -> ImageInfo | None:
    """Return the kind and size of an image held in data, or None when it is not one we know.

    Raises ValueError when the kind is recognised but the header is cut short.
    """
    kind = sniff_image_kind(data)
    if kind is None:
        return None
    try:
        width, height = _SIZE_READERS[kind](data)
    except (struct.error, IndexError):
        raise ValueError(f"the {kind.upper()} header is cut short; the image is damaged") from None
    return ImageInfo(kind, width, height, len(data))


def check_image_url(url: str) -> ImageInfo | None:
    """Check an image address; return the inline image's info, or None for a web address.

    Raises ValueError saying what is wrong and what is expected.
    """
    if url.startswith("data:"):
        return _check_data_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ValueError(
            f'"{shown}" is not an image address: expected an http(s) URL such as '
            '"https://example.com/cat.jpg" or a "data:image/jpeg;base64,..." URL'
        )
    return None


def _check_data_url(url: str) -> ImageInfo:
    header, comma, payload = url.partition(",")
    params = header[len("data:") :].split(";")
    if not comma or params[-1] != "base64" or not params[0].lower().startswith("image/"):
        raise ValueError('expected a data URL of the form "data:image/<type>;base64,<data>"')
    # Refuse before decoding so a huge payload never gets allocated twice.
    approx_size = len(payload) * 3 // 4
    if approx_size > MAX_IMAGE_BYTES:
        raise ValueError(
            f"the image is {_megabytes(approx_size)} once decoded; the limit is {_megabytes(MAX_IMAGE_BYTES)}",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ValueError('the data after "base64," is not valid base64') from None
    info = read_image_info(data)
    if info is None:
        raise ValueError(f"the decoded data is not an image: expected {', '.join(k.upper() for k in IMAGE_KINDS)}")
    try:
        missing = _missing_end(info.kind, data)
    except (IndexError, struct.error):
        missing = "its structure is cut short"
    if missing:
        raise ValueError(
            f"the {info.kind.upper()} data ends early ({missing}): the image was cut short, "
            "as by an interrupted download or copy"
        )
    declared = params[0].lower().removeprefix("image/")
    if _DECLARED_KINDS.get(declared, info.kind) != info.kind:
        raise ValueError(
            f"the data URL says image/{declared} but the data is a {info.kind.upper()} image: "
            f'declare it as "data:image/{info.kind};base64,..."'
        )
    if (
        info.width is not None
        and info.height is not None
        and not (1 <= info.width <= MAX_IMAGE_SIDE and 1 <= info.height <= MAX_IMAGE_SIDE)
    ):
        raise ValueError(
            f"the image header says {info.width} x {info.height} pixels; expected 1 to "
            f"{MAX_IMAGE_SIDE:,} pixels a side (the header is probably damaged)"
        )
    return info


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise IndexError
    return struct.unpack(">II", data[16:24])


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", data[6:10])


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # the old OS/2 header stores 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height means rows run top-down


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if len(data) < 30:
            raise IndexError
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise IndexError


# JPEG markers without a length field, and the start-of-frame markers that hold the size.
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xDA)}
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_segments(data: bytes):
    """Yield (marker, offset, length) of each header segment up to the first scan (SOS), the last one yielded.

    Raises ValueError saying where the walk cannot go on.
    """
    at = 2
    while True:
        if at + 4 > len(data):
            raise ValueError("the headers are cut short")
        if data[at] != 0xFF:
            raise ValueError(f"byte 0x{data[at]:02x} at offset {at:,} where a marker should be")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        yield marker, at, length
        if marker == 0xDA:
            return
        at += 2 + length


def _jpeg_size(data: bytes) -> tuple[int, int]:
    try:
        for marker, at, _ in _jpeg_segments(data):
            if marker in _JPEG_FRAMES:
                height, width = struct.unpack(">HH", data[at + 5 : at + 9])
                return width, height
    except ValueError:
        raise IndexError from None
    raise IndexError  # pixel data starts before any frame header


def _missing_end(kind: str, data: bytes) -> str | None:
    """What the end of a complete image of this kind would have and data lacks, or None."""
    if kind == "png":
        end = data.rfind(b"IEND")
        return None if end > 8 and len(data) >= end + 8 else "no IEND chunk"  # its type, then its CRC
    if kind == "jpeg":
        return _jpeg_missing_end(data)
    if kind == "gif":
        return _gif_missing_end(data)
    if kind == "webp":
        (riff_size,) = struct.unpack("<I", data[4:8])
        return (
            None if len(data) >= 8 + riff_size else f"{len(data):,} of the {8 + riff_size:,} bytes its header declares"
        )
    if kind == "bmp":
        (file_size,) = struct.unpack("<I", data[2:6])  # 0 is allowed: the writer did not say
        return None if len(data) >= file_size else f"{len(data):,} of the {file_size:,} bytes its header declares"
    return None


def _jpeg_missing_end(data: bytes) -> str | None:
    """Walk the segments to the main image's first scan; its end-of-image marker must follow.

    Walking by segment lengths steps over an EXIF thumbnail (a whole JPEG inside
    APP1, with its own scan and end marker), which a plain search would take for
    the photo's. Bytes after the end marker (camera trailers) are allowed.
    """
    try:
        for marker, at, length in _jpeg_segments(data):
            if marker == 0xDA:
                # Scan data cannot hold FF D9: an FF byte there is written FF 00.
                return None if data.find(b"\xff\xd9", at + 2 + length) >= 0 else "no end-of-image marker"
    except ValueError as problem:
        return str(problem)
    return None  # not reached: the walk ends at a scan or raises


def _gif_missing_end(data: bytes) -> str | None:
    """Walk a GIF's blocks; say what is cut short, if anything.

    A GIF that stops after a whole block, without its trailer byte, is taken:
    decoders show it, and such files are in circulation (older CPython releases
    ship one among IDLE's icons).
    """
    if len(data) < 13:
        return "the screen descriptor is cut short"
    flags, at = data[10], 13
    if flags & 0x80:  # a global colour table follows the screen descriptor
        at += 3 * (2 << (flags & 7))
    if at >= len(data):
        return "no image after the screen descriptor"
    while at < len(data):
        block = data[at]
        if block == 0x3B:  # the trailer
            return None
        if block == 0x21:  # an extension: introducer, label, then sub-blocks
            at += 2
        elif block == 0x2C:  # an image: descriptor, local colour table, LZW code size, then sub-blocks
            if at + 10 > len(data):
                return "an image descriptor cut short"
            local = data[at + 9]
            at += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1
        else:
            return f"byte 0x{block:02x} at offset {at:,} where a block should start"
        while True:  # sub-blocks: a length byte, that many bytes; a 0 length ends them
            if at >= len(data):
                return "a block cut short"
            length = data[at]
            at += 1 + length
            if length == 0:
                break
        if at > len(data):
            return "a block cut short"
    return None


_SIZE_READERS = {"jpeg": _jpeg_size, "png": _png_size, "gif": _gif_size, "webp": _webp_size, "bmp": _bmp_size}
