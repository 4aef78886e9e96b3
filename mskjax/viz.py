"""Figures and the HTML report: overlays of CAM, boxes and masks on a radiograph, thumbnails.

Everything is numpy + Pillow (no matplotlib). Images are gray float (H, W) in [0, 1] in the
original frame; maps (H, W) in [0, 1]; boxes (n, 4) as (x0, y0, x1, y1) float pixels of the same
frame (pixel i covers [i, i + 1)); masks (H, W) bool. Outputs are RGB uint8 (H', W', 3).

Overlay style (after the course report's figures): the radiograph in gray, the CAM as a jet
heatmap whose opacity grows with the map value (so bone stays readable where the map is low), the
predicted box in amber, the SAM mask as a translucent cyan fill with a solid outline, ground
truth (when given) as a green outline and dashed green boxes, and a caption strip underneath.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOR = (255, 190, 0)        # amber: predicted (CAM) box
MASK_COLOR = (0, 210, 255)       # cyan: SAM mask
GT_COLOR = (60, 230, 90)         # green: ground-truth mask and boxes
CAPTION_BG = (24, 26, 30)
CAPTION_FG = (235, 235, 235)


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap: values (...,) in [0, 1] -> (..., 3) float32 RGB in [0, 1]
    (dark blue -> blue -> cyan -> yellow -> red -> dark red, piecewise linear)."""
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    centres = np.asarray([0.75, 0.5, 0.25], np.float32)  # where R, G, B peak
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] (or uint8) -> (H, W, 3) float32 in [0, 1]."""
    im = np.asarray(image)
    if im.dtype == np.uint8:
        im = im.astype(np.float32) / 255.0
    if im.ndim != 2:
        raise ValueError(f"expected a gray (H, W) image, got shape {im.shape}")
    return np.repeat(np.clip(im.astype(np.float32), 0, 1)[..., None], 3, axis=-1)


def blend_heatmap(rgb: np.ndarray, cam_map: np.ndarray, alpha: float = 0.55, gamma: float = 0.8) -> np.ndarray:
    """Jet heatmap over rgb (H, W, 3) float with per-pixel opacity alpha * map**gamma."""
    m = np.clip(np.asarray(cam_map, np.float32), 0, 1)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"CAM map {m.shape} and image {rgb.shape[:2]} differ in size")
    a = (alpha * m ** gamma)[..., None]
    return rgb * (1 - a) + jet(m) * a


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(max(r, 0)):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a bool mask (inside pixels with an outside 4-neighbour), thickened
    outwards to `width` pixels."""
    m = np.asarray(mask, bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    edge = m & ~inner
    return _dilate(edge, width - 1)


def _paint(rgb: np.ndarray, where: np.ndarray, color, opacity: float = 1.0) -> None:
    c = np.asarray(color, np.float32) / 255.0
    rgb[where] = rgb[where] * (1 - opacity) + c * opacity


def _scale_for_display(h: int, w: int, min_side: int, max_side: int) -> float:
    long = max(h, w)
    if long < min_side:
        return float(np.ceil(min_side / long))  # integer upscaling keeps pixels square
    if long > max_side:
        return max_side / long
    return 1.0


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if arr.shape[:2] == hw:
        return arr
    if arr.dtype == bool:
        im = Image.fromarray(arr.astype(np.uint8) * 255)
        return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST)) > 127
    im = Image.fromarray(np.asarray(arr, np.float32))
    return np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST if nearest else Image.BILINEAR), np.float32)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def overlay(image: np.ndarray, cam_map: np.ndarray | None = None, boxes: np.ndarray | None = None,
            mask: np.ndarray | None = None, *, gt_mask: np.ndarray | None = None,
            gt_boxes: np.ndarray | None = None, caption: str | None = None,
            min_side: int = 512, max_side: int = 1024) -> np.ndarray:
    """The report figure for one radiograph.

    Args:
      image: (H, W) gray float in [0, 1] (or uint8), original frame.
      cam_map: (H, W) in [0, 1] or None. boxes: (n, 4) predicted boxes or None.
      mask: (H, W) bool predicted mask or None. gt_mask / gt_boxes: ground truth or None.
      caption: text for a strip under the image (None: no strip).
      min_side / max_side: the figure is rescaled so its long side lies in [min_side, max_side]
        (integer upscaling for small images, so thin structures and lines stay readable).

    Returns:
      (H', W', 3) uint8 RGB, H' = round(H * scale) (+ the caption strip).
    """
    gray = gray_to_rgb(image)[..., 0]
    h, w = gray.shape
    for name, layer in (("CAM map", cam_map), ("mask", mask), ("ground-truth mask", gt_mask)):
        if layer is not None and np.shape(layer) != (h, w):
            raise ValueError(f"{name} {np.shape(layer)} and image {(h, w)} differ in size")
    scale = _scale_for_display(h, w, min_side, max_side)
    hw = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    rgb = gray_to_rgb(_resize(gray, hw))
    if cam_map is not None:
        rgb = blend_heatmap(rgb, _resize(np.asarray(cam_map, np.float32), hw))
    line = max(2, int(round(max(hw) / 300)))
    if mask is not None:
        m = _resize(np.asarray(mask, bool), hw)
        _paint(rgb, m, MASK_COLOR, 0.28)
        _paint(rgb, outline(m, line), MASK_COLOR)
    if gt_mask is not None:
        _paint(rgb, outline(_resize(np.asarray(gt_mask, bool), hw), line), GT_COLOR)
    out = Image.fromarray(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    sy, sx = hw[0] / h, hw[1] / w
    for b in np.asarray(gt_boxes if gt_boxes is not None else np.zeros((0, 4))).reshape(-1, 4):
        _dashed_rect(draw, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy), GT_COLOR, max(1, line - 1), 4 * line)
    for b in np.asarray(boxes if boxes is not None else np.zeros((0, 4))).reshape(-1, 4):
        x0, y0, x1, y1 = b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=BOX_COLOR, width=line)
    if caption:
        out = _with_caption(out, caption)
    return np.asarray(out)


def _dashed_rect(draw, box, color, width: int, dash: int) -> None:
    x0, y0, x1, y1 = box
    x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
    for (a, b) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
        n = max(1, int(length // (2 * dash)))
        for i in range(n + 1):
            t0, t1 = min(1.0, 2 * i * dash / max(length, 1e-9)), min(1.0, (2 * i + 1) * dash / max(length, 1e-9))
            if t0 >= 1.0:
                break
            draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                       (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=color, width=width)


def _with_caption(img: Image.Image, caption: str) -> Image.Image:
    w, h = img.size
    size = max(12, min(22, w // 32))
    font = _font(size)
    lines = caption.split("\n")
    strip = (size + 6) * len(lines) + 10
    out = Image.new("RGB", (w, h + strip), CAPTION_BG)
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        d.text((8, h + 6 + i * (size + 6)), text, fill=CAPTION_FG, font=font)
    return out


def legend_items(has_cam: bool = True, has_gt: bool = False) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) pairs describing `overlay`'s colours, for a report's legend."""
    items = [("predicted box (CAM peak)", BOX_COLOR), ("SAM mask", MASK_COLOR)]
    if has_gt:
        items.append(("ground truth (mask outline, dashed boxes)", GT_COLOR))
    if has_cam:
        items.append(("CAM: jet colormap, low = transparent, high = red", (220, 40, 30)))
    return items


def thumbnail(rgb: np.ndarray, max_side: int = 200) -> np.ndarray:
    """Downscaled copy (antialiased) with the long side <= max_side; RGB uint8 in and out."""
    im = Image.fromarray(np.asarray(rgb, np.uint8))
    im.thumbnail((max_side, max_side), Image.LANCZOS)
    return np.asarray(im)


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes an RGB uint8 (H, W, 3), gray uint8 (H, W) or bool mask (as 0/255) PNG; makes folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    Image.fromarray(a).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1f23;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px;background:#fff}
th,td{border:1px solid #d6d6d6;padding:4px 9px;text-align:right} th{background:#eef0f3}
td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d6d6d6;padding:6px;width:206px;font-size:12px}
.card img{display:block;margin:0 auto 4px;max-width:200px;max-height:200px}
.card .p{font-weight:600} .abn{color:#b3261e} .nrm{color:#1e6b2e} .note{color:#555;font-size:13px}
.sw{display:inline-block;width:12px;height:12px;margin:0 4px -2px 12px;border:1px solid #999}
code{background:#eef0f3;padding:1px 4px}
"""


def _cell(v) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4f}"
    return html.escape(str(v))


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain HTML table; floats print with 4 decimals, nan as n/a; everything escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_figures(figures: Sequence[tuple[str, str]], width: int = 420) -> str:
    """Figures side by side, each (relative image path, caption) and linked to its full size."""
    return "<div class='grid'>" + "".join(
        f"<figure style='margin:0'><a href='{html.escape(src)}'><img src='{html.escape(src)}' alt='{html.escape(cap)}' "
        f"style='width:{int(width)}px;background:#fff;border:1px solid #d6d6d6'></a>"
        f"<figcaption class='note'>{html.escape(cap)}</figcaption></figure>" for src, cap in figures) + "</div>"


def write_report(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]],
                 cards: Sequence[dict], legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
                 subtitle: str = "") -> Path:
    """Writes a self-contained HTML page (no scripts, no external files besides the images).

    sections: (heading, HTML body) pairs, e.g. from `html_table`. cards: per image
    {"thumb": relative path, "link": relative path, "title": str, "lines": [str], "abnormal": bool|None}.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<div class='note'>{html.escape(subtitle)}</div>")
    if legend:
        parts.append("<div class='note'>" + "".join(
            f"<span class='sw' style='background:rgb{tuple(c)}'></span>{html.escape(t)}" for t, c in legend) + "</div>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    if cards:
        parts.append(f"<h2>Images ({len(cards)})</h2><div class='grid'>")
        for c in cards:
            cls = "" if c.get("abnormal") is None else (" abn" if c["abnormal"] else " nrm")
            lines = "".join(f"<div class='{('p' + cls) if i == 0 else ''}'>{html.escape(t)}</div>"
                            for i, t in enumerate(c.get("lines", [])))
            parts.append(f"<div class='card'><a href='{html.escape(c['link'])}'><img src='{html.escape(c['thumb'])}' "
                         f"alt='{html.escape(c.get('title', ''))}'></a><div title='{html.escape(c.get('title', ''))}' "
                         # a long path loses its start, not the file name: clipped on the left
                         f"style='overflow:hidden;text-overflow:ellipsis;white-space:nowrap;direction:rtl;text-align:left'>"
                         f"<span dir='ltr'>{html.escape(c.get('title', ''))}</span>"
                         f"</div>{lines}</div>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    path.write_text("".join(parts))
    return path


__all__ = ["BOX_COLOR", "GT_COLOR", "MASK_COLOR", "blend_heatmap", "gray_to_rgb", "html_figures", "html_table", "jet",
           "legend_items", "outline", "overlay", "save_png", "thumbnail", "write_report"]
