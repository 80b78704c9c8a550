"""Drawing detections: labelled boxes with their scores over the image (`dinoseg predict`)."""

import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def category_colours(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, saturated colours (hues spread by the golden ratio)."""
    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.13 + k * 0.618034) % 1.0, 0.85, 0.95)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return out


MIN_DRAWN_SIDE = 256  # smaller images are drawn enlarged (by a whole factor), so that the labels stay readable


def draw_detections(image: torch.Tensor, detections: list[dict], colours: dict) -> Image.Image:
    """`image` (uint8 [3, H, W]) with each detection's box (``box`` XYXY in its pixels) outlined in the colour of its
    ``category_id`` (`colours`; grey when absent) and labelled ``"<category_name> <score>"`` above it (inside when
    there is no room). Lower scores are drawn first, so the best boxes stay on top. An image with a side under
    `MIN_DRAWN_SIDE` pixels is drawn enlarged by the smallest whole factor that reaches it."""
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8))
    scale = max(1, math.ceil(MIN_DRAWN_SIDE / min(canvas.size)))
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    for det in sorted(detections, key=lambda d: d["score"]):
        colour = tuple(colours.get(det["category_id"], (200, 200, 200)))
        x0, y0, x1, y1 = (v * scale for v in det["box"])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{det['category_name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top + 2
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw + 2, ty + th], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x0 + 1, ty - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return canvas
