"""Image input: the file path (fit's decoding threads) and the array path give
the same pixels, for RGB, grey, palette, RGBA and 16-bit files; the accepted array
dtypes and ranges, and errors naming the image for the others; channel order;
the pixel limit (decompression bombs); unreadable files name themselves; batches
keep order with and without a transform."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import pyad.images as images_mod
from pyad.images import Preprocess, batches, iter_images, open_image, read_image


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
@pytest.mark.parametrize("crop", [None, 48])
def test_prepare_from_file_equals_from_array(tmp_path, mode, crop):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    pre = Preprocess(64, crop)
    a, b = pre.prepare(path), pre.prepare(read_image(path))
    assert a.shape == (crop or 64, crop or 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_prepare_reports_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="images: cannot read .*bad.png"):
        Preprocess(64, None).prepare(bad)


def test_batches_keep_order_with_a_transform(tmp_path):
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(paths[-1])
    plain = [b for batch in batches(paths, 3) for b in batch]
    shrunk = [b for batch in batches(paths, 3, transform=lambda p: read_image(p)[:2, :2]) for b in batch]
    assert [int(x[0, 0, 0]) for x in plain] == [int(x[0, 0, 0]) for x in shrunk] == [i * 10 for i in range(7)]
    arrays = [b for batch in batches(np.stack(plain), 3, transform=lambda a: a[:1]) for b in batch]
    assert [a.shape for a in arrays] == [(1, 8, 3)] * 7


# -- accepted array dtypes and ranges --------------------------------------------------

def _rgb(seed=0, shape=(30, 40, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _through_detector_path(batch, **kw):
    """What predict does with arrays: iter_images (validation), then Preprocess."""
    return Preprocess(32, None)(list(iter_images(batch, **kw)))


def test_uint16_arrays_are_scaled_not_saturated():
    a8 = _rgb(1)
    a16 = a8.astype(np.uint16) * 257  # the same image in 16 bits (0..65535)
    want = Preprocess(32, None)([a8])
    for got in (_through_detector_path([a16]), _through_detector_path(a16[None]), Preprocess(32, None)([a16])):
        np.testing.assert_array_equal(got, want)
    # any 16-bit value: value / 257, rounded
    r16 = np.random.default_rng(2).integers(0, 65536, (30, 40, 3)).astype(np.uint16)
    r8 = np.round(r16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(_through_detector_path([r16]), Preprocess(32, None)([r8]))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_arrays_in_unit_range(dtype):
    a8 = _rgb(3)
    a = (a8 / 255).astype(dtype)
    np.testing.assert_array_equal(_through_detector_path([a]), Preprocess(32, None)([a8]))
    np.testing.assert_array_equal(_through_detector_path(np.moveaxis(a, -1, 0)[None]), Preprocess(32, None)([a8]))


def test_torch_tensors_follow_the_same_rules():
    a8 = _rgb(3)
    chw = torch.from_numpy(np.moveaxis(a8, -1, 0).copy())
    want = Preprocess(32, None)([a8])
    np.testing.assert_array_equal(_through_detector_path(chw[None].float() / 255), want)
    np.testing.assert_array_equal(_through_detector_path([chw.double() / 255]), want)
    got = _through_detector_path((chw[None].float() / 255).to(torch.bfloat16))  # NumPy has no bfloat16
    assert (got - want).abs().max() < 0.1  # bfloat16 keeps 8 significant bits
    with pytest.raises(ValueError, match=r"images: image 0 is float32 with values in \[0, 255\]"):
        _through_detector_path(chw[None].float())


def test_uint8_arrays_are_not_copied():
    a = _rgb(4)
    assert np.shares_memory(next(iter_images([a])), a)
    chw = np.ascontiguousarray(np.moveaxis(a, -1, 0))
    assert np.shares_memory(next(iter_images(chw[None])), chw)


BAD = {
    "float 0..255": (lambda a: a.astype(np.float32),
                     r"images: image 1 is float32 with values in \[0, 255\]; float images must lie in \[0, 1\] "
                     r"— divide by 255"),
    "float normalised": (lambda a: ((a / 255 - 0.45) / 0.22).astype(np.float64),
                         r"images: image 1 is float64 with values in \[-2.04\d*, 2.5\d*\]; "
                         r"float images must lie in \[0, 1\] — pass the image before normalisation"),
    "float NaN": (lambda a: np.where(a > 250, np.nan, a / 255).astype(np.float32),
                  r"images: image 1 is float32 with NaN or Inf values; "
                  r"float images must be finite and lie in \[0, 1\]"),
    "float Inf": (lambda a: np.where(a > 250, np.inf, a / 255),
                  r"images: image 1 is float64 with NaN or Inf values"),
    "int64 0..255": (lambda a: a.astype(np.int64),
                     r"images: image 1 is int64 with values in \[0, 255\]; integer images must be uint8 \(0..255\) or "
                     r"uint16 \(0..65535\) — these values fit uint8: pass a.astype\(np.uint8\)"),
    "int32 0..65535": (lambda a: a.astype(np.int32) * 257,
                       r"images: image 1 is int32 with values in \[0, 65535\]; .* — these values fit uint16"),
    "int16 negative": (lambda a: a.astype(np.int16) - 128,
                       r"images: image 1 is int16 with values in \[-128, 127\]; integer images must be uint8"),
    "uint32": (lambda a: a.astype(np.uint32) * 70000, r"images: image 1 is uint32 with values in \[0, 17850000\]"),
    "int8": (lambda a: (a // 2).astype(np.int8), r"images: image 1 is int8 "),
    "bool": (lambda a: a > 128, r"images: image 1 is bool; expected uint8 \(0..255\), uint16 \(0..65535\) or float"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_other_dtypes_and_ranges_are_refused(case):
    make, message = BAD[case]
    good, bad = _rgb(5), make(_rgb(6))
    for call in (lambda: list(iter_images([good, bad])),
                 lambda: list(iter_images([good.astype(np.uint16), np.moveaxis(bad, -1, 0)])),
                 lambda: [b for b in batches([good, bad], 2)],
                 lambda: [b for b in batches([good, bad], 1, transform=Preprocess(32, None).prepare)],
                 lambda: Preprocess(32, None)([good, bad])):
        with pytest.raises(ValueError, match=message):
            call()
    # in an array batch every image has the same dtype: the first one is named
    with pytest.raises(ValueError, match=message.replace("image 1", "image 0")):
        list(iter_images(np.stack([bad, bad])))
    with pytest.raises(ValueError, match=message.replace("image 1", "image 0")):
        list(iter_images(torch.from_numpy(np.stack([bad, bad]))))


def test_float_range_message_is_complete():
    with pytest.raises(ValueError) as err:
        list(iter_images([_rgb(0), _rgb(0), _rgb(0), _rgb(7).astype(np.float32)]))
    assert str(err.value) == ("images: image 3 is float32 with values in [0, 255]; float images must lie in [0, 1] "
                              "— divide by 255, or pass uint8")


def test_channel_order_bgr_for_arrays():
    rgb = _rgb(8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    want = Preprocess(32, None)([rgb])
    np.testing.assert_array_equal(_through_detector_path([bgr], channel_order="bgr"), want)
    np.testing.assert_array_equal(_through_detector_path(bgr[None], channel_order="bgr"), want)
    np.testing.assert_array_equal(Preprocess(32, None)([bgr], channel_order="bgr"), want)
    np.testing.assert_array_equal(Preprocess(32, None).prepare(bgr, channel_order="bgr"),
                                  Preprocess(32, None).prepare(rgb))
    chw = np.moveaxis(bgr.astype(np.float32) / 255, -1, 0)
    np.testing.assert_array_equal(_through_detector_path(chw[None], channel_order="bgr"), want)
    [[batched]] = list(batches([bgr], 1, channel_order="bgr"))
    np.testing.assert_array_equal(batched, rgb)
    [[batched]] = list(batches([bgr], 1, transform=lambda a: a.copy(), channel_order="bgr"))
    np.testing.assert_array_equal(batched, rgb)
    # the default is RGB: the same array read as RGB differs
    assert not np.array_equal(_through_detector_path([bgr]), want)
    # grey has no channel order
    grey = rgb[..., :1]
    np.testing.assert_array_equal(_through_detector_path([grey], channel_order="bgr"), _through_detector_path([grey]))


def test_channel_order_does_not_apply_to_files(tmp_path):
    rgb = _rgb(9)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    [[a]] = list(batches([path], 1, channel_order="bgr"))
    [b] = list(iter_images([path], channel_order="bgr"))
    np.testing.assert_array_equal(a, rgb)
    np.testing.assert_array_equal(b, rgb)
    np.testing.assert_array_equal(next(iter_images(tmp_path, channel_order="bgr")), rgb)


def test_channel_order_is_checked():
    with pytest.raises(ValueError, match=r"channel_order: expected 'rgb' or 'bgr', got 'BGRA'"):
        list(iter_images([_rgb()], channel_order="BGRA"))
    with pytest.raises(ValueError, match=r"channel_order: expected 'rgb' or 'bgr'"):
        Preprocess(32, None)([_rgb()], channel_order="hsv")


# -- 16-bit image files ----------------------------------------------------------------


def write_png(path, a: np.ndarray) -> None:
    """A PNG holding exactly ``a`` (uint8 or uint16; [H, W] grey, [H, W, 2|3|4] grey+alpha,
    RGB, RGBA), written from the specification (W3C PNG, 2nd ed.: IHDR, one IDAT with filter
    type 0 per row, IEND) so 16-bit colour files exist without an encoder that makes them."""
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = a.reshape(h, -1).astype(a.dtype.newbyteorder(">"))
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, a.dtype.itemsize * 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _gradient16(channels):
    """A 16-bit gradient over the full range (values not multiples of 257) and its 8-bit version."""
    x = np.linspace(0, 65535, 300)
    g = np.stack([x, x[::-1], np.sqrt(x / 65535) * 65535, np.full_like(x, 50000)], -1)[:, :channels]
    g16 = np.round(np.repeat(g[None], 20, 0)).astype(np.uint16)
    g8 = np.round(g16 / 257).astype(np.uint8)
    return (g16[..., 0], g8[..., 0]) if channels == 1 else (g16, g8)


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey+alpha", "rgb", "rgba"])
def test_16bit_png_equals_its_8bit_version(tmp_path, channels):
    g16, g8 = _gradient16(channels)
    p16, p8 = tmp_path / "g16.png", tmp_path / "g8.png"
    write_png(p16, g16)
    write_png(p8, g8)
    if channels == 1:
        with Image.open(p16) as im:
            assert im.mode == "I;16"  # the mode Pillow's RGB conversion saturates
    a16, a8 = read_image(p16), read_image(p8)
    assert a16.dtype == np.uint8 and a16.shape == a8.shape == (20, 300, 3)
    assert np.abs(a16.astype(int) - a8).max() <= 1
    pre = Preprocess(64, 48)
    f16, f8 = pre.prepare(p16), pre.prepare(p8)  # the file-direct path fit decodes with
    assert np.abs(f16.astype(int) - f8).max() <= 1
    np.testing.assert_array_equal(f16, pre.prepare(read_image(p16)))


def test_16bit_grey_is_value_over_257_rounded(tmp_path):
    g16, g8 = _gradient16(1)
    write_png(tmp_path / "g.png", g16)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(g8[..., None], 3, -1))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_grey_tiff_modes(tmp_path, mode):
    g16, g8 = _gradient16(1)
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    path = tmp_path / "g.tif"
    Image.frombytes(mode, g16.shape[::-1], g16.astype(dtype).tobytes()).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    np.testing.assert_array_equal(read_image(path)[..., 0], g8)
    pre = Preprocess(64, None)
    np.testing.assert_array_equal(pre.prepare(path), pre.prepare(read_image(path)))


def test_32bit_integer_file_outside_16_bits_is_refused(tmp_path):
    path = tmp_path / "big.tif"
    Image.frombytes("I", (4, 2), np.array([0, 1, 2, 3, 4, 5, 6, 70000], "<i4").tobytes()).save(path)
    for call in (read_image, Preprocess(8, None).prepare):
        with pytest.raises(ValueError, match=r"images: .*big.tif is a 32-bit integer image with values in "
                                             r"\[0, 70000\]; expected 8- or 16-bit values"):
            call(path)


# -- decompression-bomb limit ----------------------------------------------------------


def _png_header(path, width, height):
    """A PNG header claiming width x height RGB pixels (no pixel data: opening reads the header only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_image_over_pillows_warning_limit_opens_silently(tmp_path):
    # 90 MP: over Pillow's default MAX_IMAGE_PIXELS (89,478,485), which warns (an error under pytest)
    path = tmp_path / "big.png"
    _png_header(path, 10000, 9000)
    with open_image(path) as im:
        assert im.size == (10000, 9000)


def test_image_over_the_limit_is_a_clear_error(tmp_path):
    path = tmp_path / "huge.png"
    _png_header(path, 20000, 10000)  # 200 MP: over Pillow's hard limit too (DecompressionBombError)
    with pytest.raises(ValueError, match=r"images: .*huge.png has 200,000,000 pixels \(20000 x 10000\), over the limit "
                                         r"of 178,956,970 .*pyad.images.MAX_PIXELS .*PYAD_MAX_IMAGE_PIXELS"):
        with open_image(path):
            pass


def test_the_limit_applies_to_every_read_and_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(_rgb(0, (50, 40, 3))).save(path)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 1999)
    for call in (read_image, Preprocess(16, None).prepare, lambda p: list(batches([p], 1))):
        with pytest.raises(ValueError, match=r"images: .*x.png has 2,000 pixels \(40 x 50\), over the limit of 1,999"):
            call(path)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", None)
    huge = tmp_path / "huge.png"
    _png_header(huge, 20000, 10000)
    with open_image(huge) as im:
        assert im.size == (20000, 10000)


def test_pillows_own_limit_does_not_leak(tmp_path, monkeypatch):
    """Pillow's limit (warning above it, error above twice it) is replaced by pyad's,
    also while decoding: a real image over a lowered Pillow limit reads silently."""
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)
    path = tmp_path / "x.png"
    Image.fromarray(_rgb(0, (50, 40, 3))).save(path)  # 2,000 pixels: 4x Pillow's lowered limit
    np.testing.assert_array_equal(read_image(path), _rgb(0, (50, 40, 3)))
    assert Preprocess(16, None).prepare(path).shape == (16, 16, 3)
    # fit's path: two decoding threads opening files at once
    prepared = [x for batch in batches([path] * 6, 2, transform=Preprocess(16, None).prepare) for x in batch]
    assert len(prepared) == 6 and all(np.array_equal(x, prepared[0]) for x in prepared)
    assert PIL.Image.MAX_IMAGE_PIXELS == 500  # left as it was


@pytest.mark.parametrize("value, limit", [("1000", 1000), ("none", None), ("0", None), (" 5_000_000 ", 5_000_000)])
def test_limit_from_the_environment(monkeypatch, value, limit):
    monkeypatch.setenv("PYAD_MAX_IMAGE_PIXELS", value)
    assert images_mod._limit_from_env() == limit


def test_limit_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("PYAD_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match=r"PYAD_MAX_IMAGE_PIXELS: expected a number of pixels, "
                                         r"or 'none' for no limit; got 'lots'"):
        images_mod._limit_from_env()
    monkeypatch.delenv("PYAD_MAX_IMAGE_PIXELS")
    assert images_mod._limit_from_env() == 2 * 89_478_485


def test_restore_takes_read_only_maps():
    """Maps that arrive as read-only views (Ray's object store, Arrow buffers) are
    restored without torch's non-writable-array warning (an error in this suite)."""
    amap = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    amap.flags.writeable = False
    out = Preprocess(image_size=64).restore(amap, (40, 48))
    assert out.shape == (40, 48) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, Preprocess(image_size=64).restore(amap.copy(), (40, 48)))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "I;16"])
def test_fast_png_decoding_gives_pillows_pixels(tmp_path, monkeypatch, mode):
    """8-bit grey / RGB / RGBA PNGs go through imagecodecs, the rest through Pillow;
    either way the pixels are the ones Pillow decodes (prepare and read_image)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    im = {"L": lambda: Image.fromarray(a[..., 0]), "RGB": lambda: Image.fromarray(a[..., :3]),
          "RGBA": lambda: Image.fromarray(a), "P": lambda: Image.fromarray(a[..., :3]).convert("P"),
          "LA": lambda: Image.fromarray(a[..., :2], "LA"), "1": lambda: Image.fromarray(a[..., 0]).convert("1"),
          "I;16": lambda: Image.fromarray(a[..., 0].astype(np.uint16) * 257)}[mode]()
    path = tmp_path / f"x{mode.replace(';', '')}.png"
    im.save(path)
    fast_calls = []
    real = images_mod._fast_png
    monkeypatch.setattr(images_mod, "_fast_png", lambda i, p: fast_calls.append(real(i, p) is not i) or real(i, p))
    pre = Preprocess(32)
    fast = pre.prepare(path), read_image(path)
    assert fast_calls == [mode in ("L", "RGB", "RGBA")] * 2  # decoded by imagecodecs, or left to Pillow
    monkeypatch.setattr(images_mod, "imagecodecs", None)
    slow = pre.prepare(path), read_image(path)
    with Image.open(path) as ref:
        want = np.asarray(ref.convert("RGB")) if mode != "I;16" else None
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
    if want is not None:
        assert np.array_equal(fast[1], want)


def test_fast_png_falls_back_on_a_damaged_file(tmp_path):
    """A PNG that imagecodecs cannot decode (truncated) is reported by Pillow's error path."""
    path = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    for read in (read_image, Preprocess(32).prepare):
        with pytest.raises(ValueError, match="cannot read .*bad.png"):
            read(path)


def _filtered_png(a: np.ndarray, filters, idat_parts: int = 1) -> bytes:
    """A PNG of ``a`` [H, W, C] uint8 whose row y is written with filter type
    ``filters[y % len(filters)]`` (PNG spec §9.2), its data split over IDAT chunks."""
    import struct
    import zlib

    h, w, c = a.shape
    bpp, rows, prev = c, [], np.zeros(w * c, np.int32)
    for y in range(h):
        cur = a[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        f = filters[y % len(filters)]
        if f == 4:
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        else:
            pred = [0 * cur, left, prev, (left + prev) // 2][f] if f < 4 else 0 * cur
        rows.append(bytes([f]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
        prev = cur
    z = zlib.compress(b"".join(rows))
    cut = np.linspace(0, len(z), idat_parts + 1).astype(int)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(b"IDAT", z[i:j]) for i, j in zip(cut[:-1], cut[1:])) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (4, 0, 1, 2, 3, 4)])
def test_png_rows_are_reconstructed_as_pillow_does(tmp_path, channels, filters):
    """The compiled row reconstruction (every filter type, 1/3/4 bytes per pixel,
    image data over several IDAT chunks) gives Pillow's pixels."""
    if images_mod._core is None or images_mod.imagecodecs is None:
        pytest.skip("needs pyad._core and imagecodecs")
    a = np.random.default_rng(len(filters) + channels).integers(0, 256, (23, 41, channels), dtype=np.uint8)
    a[5:9] = 255  # rows where the Paeth predictor's ties matter
    path = tmp_path / "f.png"
    path.write_bytes(_filtered_png(a, filters, idat_parts=3))
    got = images_mod._png_pixels(path.read_bytes())
    assert got is not None
    with Image.open(path) as ref:
        np.testing.assert_array_equal(got.reshape(a.shape), np.asarray(ref).reshape(a.shape))
    with Image.open(path) as ref:
        np.testing.assert_array_equal(read_image(path), np.asarray(ref.convert("RGB")))


def test_png_kinds_left_to_libpng(tmp_path):
    """Interlaced, 16-bit and palette PNGs are not reconstructed here (None), and a
    PNG with an unknown filter type or truncated data raises."""
    if images_mod._core is None or images_mod.imagecodecs is None:
        pytest.skip("needs pyad._core and imagecodecs")
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data = bytearray(_filtered_png(a, (1,)))
    for offset, value in ((24, 16), (25, 3), (28, 1)):  # bit depth, colour type (palette), interlace
        other = bytearray(data)
        other[offset] = value
        assert images_mod._png_pixels(bytes(other)) is None
    assert images_mod._png_pixels(b"GIF89a") is None
    bad = _filtered_png(a, (7,))  # no such filter type
    with pytest.raises(ValueError, match="filter type"):
        images_mod._png_pixels(bad)
    with pytest.raises(RuntimeError, match="inflate"):  # imagecodecs' ZlibngError
        images_mod._png_pixels(bytes(data[:-40]) + bytes(data[-12:]))  # image data cut short
