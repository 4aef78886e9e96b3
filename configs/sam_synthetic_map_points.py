"""configs/sam_synthetic_map_prompts.py, with the map's peak as a point beside its box.

    python -m mskjax.train --config configs/sam_synthetic_map_points.py --workdir runs/sam_map_points

Each map-shaped training prompt (half of them) also carries its centre, the lesion pixel moved by up
to 3% of the image, as a positive point: where a map that points at the lesion has its peak. The
tight ground-truth boxes carry a padding point. The pipeline (`mskjax.segment`) then gives its
"peak" box the map's peak as the point (checkpoint metadata "peak_point"; `--no-peak-point` leaves
it out). Everything else is configs/sam_synthetic_map_prompts.py. Issue 18, part 4.
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("sam_synthetic_map_prompts",
                                               Path(__file__).with_name("sam_synthetic_map_prompts.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.data.peak_point = True
    return c
