"""cfgrl_ros.image: Image fields -> the policy's RGB input, and a clear ImageError for anything else."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from cfgrl_ros.image import (CONVERTED, ENCODINGS, ImageError, compressed_to_rgb, fit_to_policy, image_to_rgb,
                             message_to_rgb)


@dataclasses.dataclass
class FakeImage:
    """The sensor_msgs/Image fields image_to_rgb reads (it takes any object that has them)."""
    encoding: str
    height: int
    width: int
    step: int
    data: bytes
    is_bigendian: int = 0


def make(pixels: np.ndarray, encoding: str, padding: int = 0) -> FakeImage:
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    padded = np.concatenate([rows, np.full((height, padding), 77, np.uint8)], axis=1)
    return FakeImage(encoding, height, width, padded.shape[1], padded.tobytes())


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize("padding", [0, 3])
def test_every_accepted_encoding_decodes_to_the_same_rgb(rgb, padding):
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    sources = {
        "rgb8": rgb,
        "bgr8": rgb[:, :, ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }
    assert set(sources) | {"mono8"} == set(ENCODINGS)
    for encoding, pixels in sources.items():
        decoded = image_to_rgb(make(pixels, encoding, padding))
        assert decoded.shape == (6, 5, 3) and decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, rgb, err_msg=encoding)


def test_mono8_is_replicated_to_three_channels(rgb):
    gray = rgb[:, :, 0]
    decoded = image_to_rgb(make(gray[:, :, None], "mono8", padding=2))
    np.testing.assert_array_equal(decoded, np.repeat(gray[:, :, None], 3, axis=2))


def ycbcr_bt601(rgb: np.ndarray) -> np.ndarray:
    """RGB -> (Y, Cb, Cr) in BT.601's video range (Y 16-235), written out from the standard's formula."""
    r, g, b = (rgb[..., i].astype(float) / 255 for i in range(3))
    return np.stack([16 + 65.481 * r + 128.553 * g + 24.966 * b,
                     128 - 37.797 * r - 74.203 * g + 112.0 * b,
                     128 + 112.0 * r - 93.786 * g - 18.214 * b], -1).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("encoding, order", [("yuv422", "UYVY"), ("yuv422_yuy2", "YUYV")])
def test_packed_yuv_422_decodes_in_its_byte_order(encoding, order):
    """Colours held for a pixel pair (4:2:2 shares chroma over two pixels), packed by hand in the
    byte order sensor_msgs documents: decoded back to within one level."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 120, 40], [30, 30, 30], [255, 255, 255]],
                       np.uint8)
    rgb = np.repeat(np.repeat(colours[None], 2, axis=1), 3, axis=0)  # 3 rows x 12 pixels
    ycc = ycbcr_bt601(rgb)
    packed = np.empty((3, 12, 2), np.uint8)
    luma, chroma = (0, 1) if order == "YUYV" else (1, 0)
    packed[..., luma] = ycc[..., 0]
    packed[:, 0::2, chroma], packed[:, 1::2, chroma] = ycc[:, 0::2, 1], ycc[:, 0::2, 2]  # U on even, V on odd
    decoded = image_to_rgb(make(packed, encoding, padding=4))
    assert decoded.shape == (3, 12, 3) and np.abs(decoded.astype(int) - rgb).max() <= 1
    with pytest.raises(ImageError, match="width must be even"):
        image_to_rgb(make(packed[:, :11], encoding))


@pytest.mark.parametrize("encoding", [e for e in CONVERTED if e.startswith("bayer")])
def test_bayer_mosaics_demosaic_to_the_scene(encoding):
    """A smooth scene sampled through the named colour filter (top-left pixel first) demosaics back to
    it; a pattern mixed up with another one would be off by tens of levels."""
    yy, xx = np.mgrid[0:32, 0:32]
    scene = cv2.GaussianBlur(np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1).astype(np.uint8), (5, 5), 2)
    pattern = encoding.removeprefix("bayer_").removesuffix("8")
    mosaic = np.empty((32, 32), np.uint8)
    for (dy, dx), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern):
        mosaic[dy::2, dx::2] = scene[dy::2, dx::2, "rgb".index(colour)]
    decoded = image_to_rgb(make(mosaic[:, :, None], encoding, padding=2))
    assert np.abs(decoded.astype(int) - scene)[4:-4, 4:-4].mean() < 2  # borders are interpolated less well


@dataclasses.dataclass
class FakeCompressedImage:
    format: str
    data: bytes


def test_compressed_images_decode_like_their_raw_frames(rgb):
    """PNG is lossless: the same pixels; JPEG: close (a smooth frame, so its loss stays small)."""
    smooth = cv2.resize(rgb, (40, 48), interpolation=cv2.INTER_CUBIC)
    png = FakeCompressedImage("rgb8; png compressed bgr8", cv2.imencode(".png", smooth[:, :, ::-1])[1].tobytes())
    np.testing.assert_array_equal(compressed_to_rgb(png), smooth)
    jpeg = FakeCompressedImage("rgb8; jpeg compressed bgr8",
                               cv2.imencode(".jpg", smooth[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    assert np.abs(compressed_to_rgb(jpeg).astype(int) - smooth).mean() < 8
    np.testing.assert_array_equal(message_to_rgb(png), smooth)  # a message with `format` is a compressed one
    np.testing.assert_array_equal(message_to_rgb(make(rgb, "rgb8")), rgb)


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid header declaring width x height, and one byte of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("image_format, data, message", [
    ("png", png_header(60_000, 60_000), "do not decode as an image"),  # OpenCV raises past 2**30 pixels
    ("png", png_header(64, 64), "do not decode as an image"),  # a header and almost no pixels
    ("jpeg", b"", "empty compressed image"),
    ("jpeg", b"\xff\xd8 not really a jpeg", "do not decode as an image"),
    ("16UC1; compressedDepth png", b"\x89PNG", "compressed depth map"),
])
def test_compressed_images_that_are_no_camera_frame_are_refused(image_format, data, message):
    with pytest.raises(ImageError, match=message):
        compressed_to_rgb(FakeCompressedImage(image_format, data))


def test_reads_array_buffers_as_rclpy_delivers_them(rgb):
    import array

    image = make(rgb, "rgb8")
    image.data = array.array("B", image.data)
    np.testing.assert_array_equal(image_to_rgb(image), rgb)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: setattr(m, "encoding", "nv21"), "unsupported encoding 'nv21'"),
    (lambda m: setattr(m, "encoding", "16UC1"), "unsupported encoding"),
    (lambda m: setattr(m, "encoding", ""), "unsupported encoding ''"),
    (lambda m: setattr(m, "data", m.data[:-7]), "truncated"),
    (lambda m: setattr(m, "data", m.data + b"\0"), "too long"),
    (lambda m: (setattr(m, "height", 0), setattr(m, "data", b"")), "zero-size image"),
    (lambda m: setattr(m, "width", 0), "zero-size image"),
    (lambda m: setattr(m, "step", m.width * 3 - 1), "step 14 is smaller than width\\*channels"),
    (lambda m: setattr(m, "step", m.step + 1), "expected height\\*step"),  # data no longer matches
    (lambda m: setattr(m, "is_bigendian", 7), "is_bigendian must be 0 or 1"),
])
def test_malformed_images_raise_a_clear_error(rgb, mutate, message):
    image = make(rgb, "rgb8")
    mutate(image)
    with pytest.raises(ImageError, match=message):
        image_to_rgb(image)


def test_big_endian_flag_does_not_change_one_byte_channels(rgb):
    image = make(rgb[:, :, ::-1], "bgr8")
    image.is_bigendian = 1
    np.testing.assert_array_equal(image_to_rgb(image), rgb)


def test_fit_to_policy_resizes_with_area_interpolation_and_copies():
    frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    fitted = fit_to_policy(frame, 64)
    assert fitted.shape == (64, 64, 3) and fitted.dtype == np.uint8
    np.testing.assert_array_equal(fitted, cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA))
    # A 2x2 block average: what INTER_AREA does for an exact integer downscale.
    blocks = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3) % 251
    expected = blocks.reshape(8, 2, 8, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(fit_to_policy(blocks, 8).astype(np.float64) - expected).max() <= 0.5 + 1e-9


def test_fit_to_policy_returns_a_writable_copy_of_a_read_only_view(rgb):
    square = np.ascontiguousarray(rgb[:5])
    view = np.frombuffer(square.tobytes(), np.uint8).reshape(square.shape)  # as image_to_rgb returns it
    assert not view.flags.writeable
    fitted = fit_to_policy(view, 5)  # no resize needed: still a copy
    assert fitted.flags.writeable and fitted.flags.c_contiguous and not np.shares_memory(fitted, view)
    np.testing.assert_array_equal(fitted, square)
