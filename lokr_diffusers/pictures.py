"""Small PIL drawing helpers for the demo: latents as colour tiles, a diverging heatmap, a line chart,
captioned sheets. PIL and numpy only (no matplotlib); every function returns a PIL image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GREY = (120, 120, 120)


def font(size: int = 13) -> Any:
    """PIL's built-in font at `size` (a bitmap font on Pillow < 10.1, which has no sizes)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return int(right - left), int(bottom - top)


def latent_rgb(latent: np.ndarray, lo: np.ndarray, hi: np.ndarray, zoom: int) -> Image.Image:
    """Channels 0, 1, 2 of a (C, H, W) latent as R, G, B, each mapped linearly from [lo[c], hi[c]] to
    [0, 255] (clipped), upscaled `zoom` times with nearest-neighbour so each latent pixel is a square."""
    rgb = (latent[:3] - lo[:3, None, None]) / np.maximum(hi[:3] - lo[:3], 1e-8)[:, None, None]
    pixels = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)


def colour_range(latent: np.ndarray, spread: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) = mean ∓ spread·std of a (C, H, W) latent: one mapping for every tile."""
    mean, std = latent.mean(axis=(1, 2)), latent.std(axis=(1, 2)) + 1e-8
    return mean - spread * std, mean + spread * std


def diverging(values: np.ndarray, vmax: float) -> np.ndarray:
    """Blue (-vmax) - white (0) - red (+vmax) colours for a 2-D array: (H, W, 3) uint8."""
    x = np.clip(values / max(vmax, 1e-12), -1.0, 1.0)[..., None]
    white, red, blue = np.array([255.0, 255, 255]), np.array([200.0, 30, 40]), np.array([35.0, 80, 200])
    rgb = np.where(x >= 0, white + x * (red - white), white + (-x) * (blue - white))
    return rgb.round().astype(np.uint8)


def heatmap(values: np.ndarray, vmax: float, cell: int, grid: tuple[int, int] | None = None) -> Image.Image:
    """A 2-D array as a diverging heatmap, `cell` pixels per entry, with a thin frame; `grid` = (rows,
    cols) of a block size draws a line between blocks (the Kronecker structure)."""
    image = Image.fromarray(np.ascontiguousarray(diverging(values, vmax)), "RGB")
    image = image.resize((image.width * cell, image.height * cell), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    if grid is not None:
        rows, cols = grid
        for r in range(rows, values.shape[0], rows):
            draw.line([(0, r * cell), (image.width, r * cell)], fill=INK, width=1)
        for c in range(cols, values.shape[1], cols):
            draw.line([(c * cell, 0), (c * cell, image.height)], fill=INK, width=1)
    draw.rectangle([0, 0, image.width - 1, image.height - 1], outline=INK)
    return image


def colour_bar(vmax: float, height: int, width: int = 14) -> Image.Image:
    """A vertical blue-white-red bar labelled +vmax, 0, -vmax."""
    ramp = np.linspace(vmax, -vmax, height)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(np.ascontiguousarray(diverging(ramp, vmax)), "RGB")
    fnt = font(11)
    labels = [f"{vmax:+.2g}", "0", f"{-vmax:+.2g}"]
    sheet = Image.new("RGB", (width + 6 + 48, height + 12), BACKGROUND)
    sheet.paste(bar, (0, 6))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle([0, 6, width - 1, height + 5], outline=INK)
    for label, y in zip(labels, (6, 6 + height // 2, 6 + height - 1), strict=True):
        draw.text((width + 4, y - 6), label, fill=INK, font=fnt)
    return sheet


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], about n of them."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values 1, 2, 5 x 10^k between lo and hi (both > 0); the decades only when there are many."""
    out = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
           for m in (1, 2, 5)]
    out = [v for v in out if lo <= v <= hi]
    return out if len(out) <= 8 else [v for v in out if f"{v:.0e}".startswith("1")]


def line_chart(series: Sequence[tuple[str, Sequence[float], tuple[int, int, int], int]], title: str,
               xlabel: str, ylabel: str, size: tuple[int, int] = (640, 360), log_y: bool = False) -> Image.Image:
    """Lines (label, y values at x = 1..n, colour, width) on shared axes with ticks, labels and a legend."""
    w, h = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    fnt, small = font(14), font(11)
    ys = [v for _, vals, _, _ in series for v in vals]
    n = max(len(vals) for _, vals, _, _ in series)
    tf = (lambda v: float(np.log10(max(v, 1e-12)))) if log_y else float
    lo, hi = tf(min(ys)), tf(max(ys))
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    pw, ph = w - left - right, h - top - bottom

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + (i / max(n - 1, 1)) * pw, top + ph - (tf(v) - lo) / (hi - lo) * ph

    values = (log_ticks(10 ** lo, 10 ** hi) or nice_ticks(10 ** lo, 10 ** hi)) if log_y else nice_ticks(lo, hi)
    for v in values:
        y = top + ph - (tf(v) - lo) / (hi - lo) * ph
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        label = f"{v:.3g}"
        d.text((left - 6 - text_size(d, label, small)[0], y - 7), label, fill=INK, font=small)
    steps = [1, *[s for s in nice_ticks(0, n) if s > 1]] if n > 1 else [1]
    for s in steps:
        x = left + ((s - 1) / max(n - 1, 1)) * pw
        d.line([(x, top + ph), (x, top + ph + 4)], fill=INK)
        label = str(int(s))
        d.text((x - text_size(d, label, small)[0] / 2, top + ph + 6), label, fill=INK, font=small)
    d.rectangle([left, top, left + pw, top + ph], outline=INK)
    for _, vals, colour, width in series:
        pts = [xy(i, v) for i, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=width)
    d.text((left, 10), title, fill=INK, font=fnt)
    d.text((left + pw / 2 - text_size(d, xlabel, fnt)[0] / 2, h - 22), xlabel, fill=INK, font=fnt)
    ylab = Image.new("RGB", (text_size(d, ylabel, fnt)[0] + 4, 18), BACKGROUND)
    ImageDraw.Draw(ylab).text((2, 0), ylabel, fill=INK, font=fnt)
    rotated = ylab.rotate(90, expand=True)
    img.paste(rotated, (4, top + ph // 2 - rotated.height // 2))
    y = top + 8
    for name, _, colour, width in series:
        tw = text_size(d, name, small)[0]
        x = left + pw - tw - 40
        d.line([(x, y + 6), (x + 26, y + 6)], fill=colour, width=max(width, 2))
        d.text((x + 32, y), name, fill=INK, font=small)
        y += 16
    return img


def caption_block(lines: Sequence[str], width: int, size: int = 13) -> Image.Image:
    """Left-aligned lines of text, wrapped to `width` pixels."""
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and text_size(probe, trial, fnt)[0] > width - 16:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    step = size + 5
    img = Image.new("RGB", (width, step * len(wrapped) + 10), BACKGROUND)
    d = ImageDraw.Draw(img)
    for k, line in enumerate(wrapped):
        d.text((8, 5 + k * step), line, fill=INK, font=fnt)
    return img


def stack(images: Sequence[Image.Image], vertical: bool = True, gap: int = 0) -> Image.Image:
    """Images one below the other (or side by side), left/top-aligned, on white."""
    if vertical:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    else:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    sheet = Image.new("RGB", size, BACKGROUND)
    pos = 0
    for image in images:
        sheet.paste(image, (0, pos) if vertical else (pos, 0))
        pos += (image.height if vertical else image.width) + gap
    return sheet


def labelled(image: Image.Image, label: str, size: int = 12, width: int | None = None) -> Image.Image:
    """`image` with a one-line label above it."""
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    w = max(width or 0, image.width, text_size(probe, label, fnt)[0] + 4)
    sheet = Image.new("RGB", (w, image.height + size + 8), BACKGROUND)
    d = ImageDraw.Draw(sheet)
    d.text((0, 2), label, fill=INK, font=fnt)
    sheet.paste(image, (0, size + 8))
    return sheet
