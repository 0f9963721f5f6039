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
    with pytest.raises(ValueError, match=r'says image/jpeg but the data is a PNG image: declare it as "data:image/png;base64,..."'):
        check_image_url(data_url(png_bytes(4, 4), "image/jpeg"))
    assert check_image_url(data_url(jpeg_bytes(4, 4), "image/jpg")).kind == "jpeg"  # the common alias
    assert check_image_url(data_url(bmp_bytes(4, 4), "image/x-ms-bmp")).kind == "bmp"


@pytest.mark.parametrize(("width", "height"), [(0, 0), (100_000, 100_000), (20, 0)])
def test_it_refuses_an_image_with_impossible_dimensions(width, height):
    with pytest.raises(ValueError, match=rf"header says {width} x {height} pixels; expected 1 to 16,384 pixels a side"):
        check_image_url(data_url(png_bytes(width, height)))
