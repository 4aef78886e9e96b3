"""Render a contact sheet of synthetic radiographs: one row per body part, columns normal,
fracture, hardware, lesion (abnormalities outlined in red, their boxes in yellow).

    python tools/contact_sheet.py [--out docs/synthetic_contact_sheet.png] [--seed 0] [--height 150]

Images come straight from `mskjax.data.synthetic.render_study` (nothing is written but the sheet).
The sheet is saved as a 64-gray palette PNG (plus the two outline colours) to stay small.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mskjax.data import synthetic

COLUMNS = (None, "fracture", "hardware", "lesion")


def outline(mask: np.ndarray) -> np.ndarray:
    """Boolean edge pixels of a boolean mask (4-neighbourhood)."""
    m = np.pad(mask, 1)
    interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def tile(image: np.ndarray, mask: np.ndarray | None, boxes: list, height: int) -> Image.Image:
    """RGB thumbnail `height` px tall with the mask outline (red) and boxes (yellow)."""
    scale = height / image.shape[0]
    width = max(1, int(round(image.shape[1] * scale)))
    im = Image.fromarray(image, mode="L").resize((width, height), Image.BILINEAR).convert("RGB")
    if mask is not None:
        small = np.asarray(Image.fromarray(mask, mode="L").resize((width, height), Image.NEAREST)) > 0
        rgb = np.asarray(im).copy()
        rgb[outline(small)] = (255, 40, 40)
        im = Image.fromarray(rgb)
        draw = ImageDraw.Draw(im)
        for b in boxes:
            x0, y0, x1, y1 = (v * scale for v in b["box"])
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 220, 0))
    return im


def contact_sheet(seed: int = 0, height: int = 150, size_range=(160, 320)) -> Image.Image:
    """The sheet as an RGB image: rows = synthetic.PARTS, columns = COLUMNS, with labels."""
    label_w = 86
    rows = []
    for r, part in enumerate(synthetic.PARTS):
        tiles = []
        for c, kind in enumerate(COLUMNS):
            res = synthetic.render_study(seed, 1000 + 10 * r + c, part, kind, size_range)
            tiles.append(tile(res["images"][0], res["masks"][0], res["boxes"][0], height))
        rows.append(tiles)
    col_w = [max(rows[r][c].width for r in range(len(rows))) for c in range(len(COLUMNS))]
    head = 16
    sheet = Image.new("RGB", (label_w + sum(col_w) + 2 * len(COLUMNS), head + len(rows) * (height + 2)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    x = label_w
    for c, kind in enumerate(COLUMNS):
        draw.text((x + 4, 2), kind or "normal", fill=(230, 230, 230))
        x += col_w[c] + 2
    for r, part in enumerate(synthetic.PARTS):
        y = head + r * (height + 2)
        draw.text((4, y + height // 2 - 6), part, fill=(230, 230, 230))
        x = label_w
        for c, t in enumerate(rows[r]):
            sheet.paste(t, (x + (col_w[c] - t.width) // 2, y))
            x += col_w[c] + 2
    return sheet


def to_palette(sheet: Image.Image, levels: int = 64) -> Image.Image:
    """Palette image: `levels` grays plus the outline red and box yellow (keeps the PNG small)."""
    rgb = np.asarray(sheet).astype(np.int32)
    gray = np.clip(rgb.mean(axis=-1) * (levels - 1) / 255.0 + 0.5, 0, levels - 1).astype(np.uint8)
    idx = gray.copy()
    colored = (np.abs(rgb[..., 0] - rgb[..., 2]) > 60)
    idx[colored & (rgb[..., 1] < 128)] = levels
    idx[colored & (rgb[..., 1] >= 128)] = levels + 1
    pal = [int(round(v * 255 / (levels - 1))) for v in range(levels) for _ in range(3)]
    pal += [255, 40, 40, 255, 220, 0]
    out = Image.fromarray(idx, mode="P")
    out.putpalette(pal + [0] * (768 - len(pal)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/synthetic_contact_sheet.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=150, help="thumbnail height in pixels")
    args = ap.parse_args(argv)
    sheet = contact_sheet(args.seed, args.height)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_palette(sheet).save(out, optimize=True)
    print(f"{out}: {sheet.width}x{sheet.height}, {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
