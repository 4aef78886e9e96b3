"""configs/sam_synthetic.py, also trained on the prompts the pipeline will give it: the demo's
classifier's own maps (issue 18, part 4).

    python -m mskjax.train --config configs/sam_synthetic_classifier_maps.py --workdir runs/sam_cmaps \
        [--config.data.map_prompts=CLASSIFIER_DIR] [--config.data.root=runs/demo/data ...]

Before training, the classifier named by data.map_prompts (default: the demo's) draws its map (layer2 LayerCAM) on every
training image, and the box the pipeline puts around the map's peak (64 px at its 128 px input;
`mskjax.pipeline.MapPrompter`). For half of the training images the first prompt is that box with
the map inside it as the dense mask prompt (`mskjax.sam.map_prompt`), scored against the union of
the image's lesions; the other prompts are the usual tight, jittered ground-truth boxes (which the
pipeline's refine pass gives). The checkpoint records the map and box (metadata "map_prompt"), and
`mskjax.segment` must be run with the same (`--cam layer_cam --cam-layer layer2 --box-side 64`).
"""
from mskjax.train.config import config_beside


def get_config():
    c = config_beside(__file__, "sam_synthetic.py")
    c.data.map_prompts = "runs/demo/classifier/best"  # the classifier whose maps the pipeline will use
    c.data.map_prompt_share = 0.5
    c.data.map_cam = "layer_cam"
    c.data.map_cam_layer = "layer2"
    c.data.map_box_side = 64.0
    return c
