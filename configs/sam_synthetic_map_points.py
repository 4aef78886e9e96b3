"""configs/sam_synthetic_map_prompts.py, with the map's peak as a point beside its box.

    python -m mskjax.train --config configs/sam_synthetic_map_points.py --workdir runs/sam_map_points

Each map-shaped training prompt (half of them) also carries its centre, the lesion pixel moved by up
to 3% of the image, as a positive point: where a map that points at the lesion has its peak. The
tight ground-truth boxes carry a padding point. The pipeline (`mskjax.segment`) then gives its
"peak" box the map's peak as the point (checkpoint metadata "peak_point"; `--no-peak-point` leaves
it out). Everything else is configs/sam_synthetic_map_prompts.py. Issue 18, part 4.
"""
from mskjax.train.config import config_beside


def get_config():
    c = config_beside(__file__, "sam_synthetic_map_prompts.py")
    c.data.peak_point = True
    return c
