"""What the map-prompt probes (tools/box_sizes.py, tools/crop_prompts.py) share: the abnormal images
with lesion masks they measure, and the JSON record each writes."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax.inputs import items_from_dataset  # noqa: E402


def abnormal_items_with_masks(dataset: str) -> list:
    """The items of `dataset` (mskjax.segment's --dataset spec) labelled abnormal that have a mask."""
    return [it for it in items_from_dataset(dataset)[0] if it.label == 1 and it.mask_path]


def write_record(args, t0: float, **fields) -> dict:
    """Writes {"args", "machine", "date", "seconds" (since t0), **fields} to args.json (its folder
    created), prints where, and returns the record."""
    out = {"args": vars(args), "machine": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t0, 1), **fields}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"{out['seconds']} s; JSON {args.json}")
    return out
