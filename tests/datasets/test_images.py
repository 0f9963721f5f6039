import struct

import pytest

from datasets_app import images
from datasets_app.images import ImageInfo, check_image_url, read_image_info, sniff_image_kind
from tests.datasets.support import bmp_bytes, data_url, gif_bytes, jpeg_bytes, png_bytes, webp_bytes


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (png_bytes(640, 480), "png"),
        (jpeg_bytes(640, 480), "jpeg"),
        (gif_bytes(640, 480), "gif"),
        (bmp_bytes(640, 480), "bmp"),
        (webp_bytes(640, 480, b"VP8X"), "webp"),
        (webp_bytes(640, 480, b"VP8L"), "webp"),
        (webp_bytes(640, 480, b"VP8 "), "webp"),
    ],
)
def test_it_reads_kind_and_size_from_the_header(data, kind):
    assert read_image_info(data) == ImageInfo(kind, 640, 480, len(data))


def test_it_does_not_take_text_or_archives_for_images():
    assert sniff_image_kind(b'{"messages": []}') is None
    assert sniff_image_kind(b"PK\x03\x04rest of a zip") is None
    assert read_image_info(b"plain text") is None


def test_it_reports_a_header_that_is_cut_short():
    with pytest.raises(ValueError, match="PNG header is cut short"):
        read_image_info(png_bytes(10, 10)[:14])


def test_it_accepts_web_addresses_without_fetching_them():
    assert check_image_url("https://example.com/cat.jpg") is None
    assert check_image_url("http://10.0.0.5:8000/a.png?x=1") is None


@pytest.mark.parametrize("url", ["ftp://example.com/cat.jpg", "cat.jpg", "https://", "file:///tmp/cat.jpg"])
def test_it_refuses_addresses_that_are_not_http_with_a_host(url):
    with pytest.raises(ValueError, match="is not an image address: expected an http"):
        check_image_url(url)


def test_it_decodes_an_inline_image_and_reads_its_size():
    data = jpeg_bytes(32, 16)
    assert check_image_url(data_url(data, "image/jpeg")) == ImageInfo("jpeg", 32, 16, len(data))
    assert check_image_url(data_url(data, "image/JPEG;name=cat.jpg")).kind == "jpeg"


def test_it_refuses_inline_data_that_is_not_base64():
    with pytest.raises(ValueError, match='after "base64," is not valid base64'):
        check_image_url("data:image/png;base64,iVBOR***")


def test_it_refuses_inline_data_that_is_not_an_image():
    with pytest.raises(ValueError, match="decoded data is not an image: expected JPEG, PNG, GIF, WEBP, BMP"):
        check_image_url(data_url(b"%PDF-1.4 not an image"))


def test_it_refuses_a_data_url_without_image_type_or_base64():
    with pytest.raises(ValueError, match=r'expected a data URL of the form "data:image/<type>;base64,<data>"'):
        check_image_url("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ValueError, match="expected a data URL"):
        check_image_url("data:image/png,rawbytes")


def test_it_refuses_an_image_over_the_size_limit_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"the image is 0\.0 MB once decoded; the limit is 0\.0 MB"):
        check_image_url(data_url(png_bytes(1, 1) + b"\x00" * 2000))
    assert check_image_url(data_url(png_bytes(1, 1))).kind == "png"


def test_it_refuses_a_data_url_whose_type_is_not_its_data():
    with pytest.raises(
        ValueError, match=r'says image/jpeg but the data is a PNG image: declare it as "data:image/png;base64,..."'
    ):
        check_image_url(data_url(png_bytes(4, 4), "image/jpeg"))
    assert check_image_url(data_url(jpeg_bytes(4, 4), "image/jpg")).kind == "jpeg"  # the common alias
    assert check_image_url(data_url(bmp_bytes(4, 4), "image/x-ms-bmp")).kind == "bmp"


@pytest.mark.parametrize(("width", "height"), [(0, 0), (100_000, 100_000), (20, 0)])
def test_it_refuses_an_image_with_impossible_dimensions(width, height):
    with pytest.raises(ValueError, match=rf"header says {width} x {height} pixels; expected 1 to 16,384 pixels a side"):
        check_image_url(data_url(png_bytes(width, height)))


def _declaring_more(data: bytes, at: int) -> bytes:
    """The image as if cut short after its header: the header declares 100 bytes more."""
    (size,) = struct.unpack("<I", data[at : at + 4])
    return data[:at] + struct.pack("<I", size + 100) + data[at + 4 :]


def _gif_with_pixels() -> bytes:
    """A 64 x 48 GIF with a colour table, an extension and one image block of pixel data."""
    screen = gif_bytes(64, 48)[:10] + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    extension = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    image = b"\x2c" + struct.pack("<HHHH", 0, 0, 64, 48) + b"\x00" + b"\x02" + b"\x0a" + bytes(range(10)) + b"\x00"
    return screen + extension + image + b";"


def test_a_gif_without_its_trailer_byte_but_whole_blocks_is_taken():
    whole = _gif_with_pixels()
    assert check_image_url(data_url(whole[:-1], "image/gif")).kind == "gif"
    with pytest.raises(ValueError, match="where a block should start"):
        check_image_url(data_url(whole[:-1] + b"\x99", "image/gif"))


@pytest.mark.parametrize(
    ("data", "media_type", "damaged", "missing"),
    [
        (png_bytes(64, 48), "image/png", lambda d: d[:-4], "no IEND chunk"),
        (jpeg_bytes(64, 48), "image/jpeg", lambda d: d[:-1], "no end-of-image marker"),
        (_gif_with_pixels(), "image/gif", lambda d: d[:-6], "a block cut short"),
        (
            webp_bytes(64, 48, b"VP8L"),
            "image/webp",
            lambda d: _declaring_more(d, 4),
            "25 of the 125 bytes its header declares",
        ),
        (bmp_bytes(64, 48), "image/bmp", lambda d: _declaring_more(d, 2), "54 of the 154 bytes its header declares"),
    ],
)
def test_it_refuses_an_image_cut_short_and_takes_it_whole(data, media_type, damaged, missing):
    assert check_image_url(data_url(data, media_type)).size == len(data)
    with pytest.raises(ValueError, match=f"ends early \\({missing}\\).*cut short"):
        check_image_url(data_url(damaged(data), media_type))


def test_a_jpeg_with_bytes_after_its_end_is_whole():
    scanned = jpeg_bytes(64, 48)
    assert check_image_url(data_url(scanned + b"trailer from a camera", "image/jpeg")).kind == "jpeg"
    with pytest.raises(ValueError, match="no end-of-image marker"):
        check_image_url(data_url(scanned[:-2], "image/jpeg"))


def test_a_photo_cut_before_its_scan_is_not_taken_whole_because_of_its_thumbnail():
    photo = jpeg_bytes(64, 48)
    thumbnail = jpeg_bytes(8, 8)  # a whole JPEG, with its own scan and end marker, inside APP1
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(thumbnail)) + b"Exif\x00\x00" + thumbnail
    with_thumbnail = photo[:2] + app1 + photo[2:]
    assert check_image_url(data_url(with_thumbnail, "image/jpeg")).kind == "jpeg"
    cut_before_scan = with_thumbnail[: with_thumbnail.rfind(b"\xff\xda")]
    with pytest.raises(ValueError, match="cut short"):
        check_image_url(data_url(cut_before_scan, "image/jpeg"))


def test_a_gif_of_a_few_bytes_is_an_error_on_its_line_not_a_crash():
    with pytest.raises(ValueError, match="screen descriptor is cut short"):
        check_image_url(data_url(b"GIF89a\x01\x00\x01\x00", "image/gif"))
