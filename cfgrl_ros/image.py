"""sensor_msgs/Image and CompressedImage bytes -> the policy's RGB uint8 input, without cv_bridge or rclpy.

Works on any object with the message's fields (Image: encoding, height, width, step, is_bigendian,
data; CompressedImage: format, data), so tests and bag readers can use it too. Every malformed image
raises ImageError saying what is wrong; nothing is guessed, because a misread frame would silently
become a wrong action.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

# encoding -> (channels, channel order to take RGB from the decoded pixel)
ENCODINGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}
# encoding -> (bytes per pixel, OpenCV conversion to RGB), for what USB and machine-vision cameras send:
# packed 4:2:2 YUV (BT.601 video range; sensor_msgs' yuv422 is UYVY, yuv422_yuy2 is YUYV) and Bayer
# mosaics (sensor_msgs names the pattern from the top-left pixel, OpenCV from the second row and column,
# as cv_bridge maps them; checked by re-mosaicking in tests/test_image.py).
CONVERTED: dict[str, tuple[int, int]] = {
    "yuv422": (2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, cv2.COLOR_YUV2RGB_YUYV),
    "bayer_rggb8": (1, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": (1, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": (1, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": (1, cv2.COLOR_BayerGB2RGB),
}
ACCEPTED = (*ENCODINGS, *CONVERTED)


class ImageError(ValueError):
    """An image the policy cannot use: unsupported encoding or inconsistent size fields."""


class CompressedImageLike(Protocol):
    format: str
    data: bytes


class ImageLike(Protocol):
    encoding: str
    height: int
    width: int
    step: int
    is_bigendian: int
    data: bytes  # or any buffer: rclpy gives array.array('B')


def image_to_rgb(image: ImageLike) -> np.ndarray:
    """Decode an Image message into an (height, width, 3) RGB uint8 array (a view where possible).

    Rows may carry padding (step > width * channels). All accepted encodings have one byte per
    channel, so is_bigendian does not change the bytes; it must still be a valid flag (0 or 1).
    """
    encoding = image.encoding
    if encoding not in ACCEPTED:
        raise ImageError(f"unsupported encoding {encoding!r}; accepted: {', '.join(ACCEPTED)}")
    channels = ENCODINGS[encoding][0] if encoding in ENCODINGS else CONVERTED[encoding][0]
    height, width, step = int(image.height), int(image.width), int(image.step)
    if height <= 0 or width <= 0:
        raise ImageError(f"zero-size image ({width}x{height})")
    if encoding.startswith("yuv422") and width % 2:
        raise ImageError(f"{encoding} packs pixels in pairs: the width must be even, got {width}")
    if encoding.startswith("bayer") and (width < 2 or height < 2):
        raise ImageError(f"{encoding} needs at least a 2x2 mosaic, got {width}x{height}")
    if image.is_bigendian not in (0, 1):
        raise ImageError(f"is_bigendian must be 0 or 1, got {image.is_bigendian!r}")
    row_bytes = width * channels
    if step < row_bytes:
        raise ImageError(f"step {step} is smaller than width*channels = {width}*{channels} = {row_bytes} "
                         f"for {encoding}")
    buffer = np.frombuffer(image.data, dtype=np.uint8)
    if buffer.size != height * step:
        raise ImageError(f"data holds {buffer.size} bytes, expected height*step = {height}*{step} = {height * step} "
                         f"({'truncated' if buffer.size < height * step else 'too long'})")
    pixels = buffer.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    if encoding in CONVERTED:
        return cv2.cvtColor(np.ascontiguousarray(pixels if channels > 1 else pixels[:, :, 0]), CONVERTED[encoding][1])
    order = ENCODINGS[encoding][1]
    if order == (0, 1, 2) and channels == 3:
        return pixels
    return pixels[:, :, list(order)]


def compressed_to_rgb(image: CompressedImageLike) -> np.ndarray:
    """Decode a CompressedImage (JPEG or PNG, as image_transport's compressed plugin sends; any format
    OpenCV reads) into an (height, width, 3) RGB uint8 array."""
    if "compresseddepth" in image.format.lower():
        raise ImageError(f"format {image.format!r} is a compressed depth map, not a camera image")
    buffer = np.frombuffer(image.data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageError("empty compressed image")
    bgr, reason = None, ""
    try:
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)  # 8-bit 3-channel whatever was compressed; None if not
    except cv2.error as error:  # e.g. a header declaring more pixels than OpenCV decodes (2**30)
        reason = f": {getattr(error, 'msg', error)}"
    if bgr is None:
        raise ImageError(f"{buffer.size} bytes that do not decode as an image (format {image.format!r}){reason}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def message_to_rgb(image: ImageLike | CompressedImageLike) -> np.ndarray:
    """image_to_rgb for an Image, compressed_to_rgb for a CompressedImage (the one with a `format`)."""
    return compressed_to_rgb(image) if hasattr(image, "format") else image_to_rgb(image)


def fit_to_policy(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size, 3) with area interpolation when needed; always a new, writable array
    (the input may be a read-only view of a message buffer).

    The whole frame is resized (no crop), so a non-square camera image is squashed: train on frames
    with the same aspect ratio as the robot's camera.
    """
    if rgb.shape[:2] != (size, size):
        return cv2.resize(np.ascontiguousarray(rgb), (size, size), interpolation=cv2.INTER_AREA)
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)

