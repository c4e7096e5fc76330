import pytest

from klotski.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 << 30), ("512MiB", 512 << 20), ("64KiB", 64 << 10), ("24GB", 24 * 10**9), ("1.5 GiB", 3 << 29),
    ("100", 100), ("7B", 7), ("2TiB", 2 << 40), (4096, 4096), ("1e9", 10**9),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-3GiB", True, None, [1]])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(24 << 30) == "24.0 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(24 * 10**9, binary=False) == "24.0 GB"
    assert parse_bytes(format_bytes(3 << 20).replace(" ", "")) == 3 << 20
