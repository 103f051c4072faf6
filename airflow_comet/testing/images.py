"""Render the simulator's output images: a gradient coloured by the prompt, with the prompt drawn on it.

The pixels depend only on the arguments, so a cached file can be dropped and redrawn identically, and a
person looking at a saved file can tell which prompt made it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import textwrap

try:  # Pillow is the optional "simulator" extra; the server itself runs without it.
    from PIL import Image, ImageChops, ImageDraw, ImageFont
except ImportError:  # pragma: no cover - exercised only without Pillow
    Image = None  # type: ignore[assignment]

__all__ = ["ASPECT_RATIOS", "CONTENT_TYPES", "image_size", "render_image"]

#: Output sizes per aspect ratio, kept near 512 px on the long side so rendering stays fast.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (512, 512),
    "16:9": (640, 360),
    "9:16": (360, 640),
    "4:3": (576, 432),
    "3:4": (432, 576),
    "3:2": (600, 400),
    "2:3": (400, 600),
    "4:5": (448, 560),
    "5:4": (560, 448),
    "21:9": (672, 288),
    "9:21": (288, 672),
}

#: Output format (as the ``output_format`` input spells it) -> Content-Type.
CONTENT_TYPES: dict[str, str] = {"webp": "image/webp", "png": "image/png", "jpg": "image/jpeg"}

_PIL_FORMATS = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}


def image_size(aspect_ratio: str | None) -> tuple[int, int]:
    """Pixel size for an ``aspect_ratio`` input; unknown values (e.g. ``match_input_image``) give 1:1."""
    return ASPECT_RATIOS.get(aspect_ratio or "1:1", ASPECT_RATIOS["1:1"])


def render_image(
    prompt: str,
    *,
    width: int = 512,
    height: int = 512,
    output_format: str = "webp",
    quality: int = 80,
    index: int = 0,
    note: str = "",
) -> bytes:
    """Encoded image bytes in ``output_format`` (webp, png or jpg)."""
    if Image is None:
        raise RuntimeError("The CometAPI simulator needs Pillow to draw images: pip install 'airflow-comet[simulator]'")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    first, second, third = digest[0:3], digest[3:6], hashlib.sha256(digest + bytes([index % 256])).digest()[0:3]
    size = (width, height)

    # Two-colour linear gradient; its direction also comes from the prompt.
    mask = Image.linear_gradient("L")
    mask = mask.transpose(Image.Transpose.ROTATE_90) if digest[6] % 2 else mask
    mask = mask.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if digest[7] % 2 else mask
    img = Image.composite(
        Image.new("RGB", size, tuple(first)), Image.new("RGB", size, tuple(second)), mask.resize(size)
    )
    # A soft blob of a third colour, placed by the output index, so outputs of one prediction differ.
    blob = ImageChops.offset(
        Image.radial_gradient("L").resize(size), (digest[8] + 97 * index) % width, (digest[9] + 61 * index) % height
    )
    img = Image.composite(img, Image.new("RGB", size, tuple(third)), blob)

    draw = ImageDraw.Draw(img)
    font_size = max(12, min(width, height) // 20)
    margin = font_size
    chars = max(8, int((width - 2 * margin) / (font_size * 0.55)))
    max_lines = max(1, (height - 3 * margin) // int(font_size * 1.25) - 1)
    lines = textwrap.wrap(prompt or "(empty prompt)", chars, max_lines=max_lines, placeholder=" ...")
    # A dark outline keeps white text readable on any gradient without an extra compositing pass.
    draw.multiline_text(
        (margin, margin), "\n".join(lines), font=_font(font_size), fill="white", stroke_width=2, stroke_fill="black"
    )
    footer = f"#{index}  {width}x{height}  {output_format}" + (f"  {note}" if note else "")
    small = max(10, font_size * 2 // 3)
    draw.text(
        (margin, height - margin - small),
        footer[: chars * 2],
        font=_font(small),
        fill="white",
        stroke_width=1,
        stroke_fill="black",
    )

    buf = io.BytesIO()
    fmt = _PIL_FORMATS[output_format]
    # Speed over size: it is test data.
    if fmt == "PNG":
        img.save(buf, fmt, compress_level=1)
    elif fmt == "WEBP":
        img.save(buf, fmt, quality=int(quality), method=0)
    else:
        img.save(buf, fmt, quality=int(quality))
    return buf.getvalue()


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # old Pillow or no FreeType: the fixed bitmap font still works
        return ImageFont.load_default()
