"""configs/litemedsam_synthetic.py, also trained on the prompts a class activation map gives.

    python -m mskjax.train --config configs/litemedsam_synthetic_map_prompts.py \
        --workdir runs/litemedsam_synthetic_map_prompts

LiteMedSAM (the packaged pretrained weights) with its mask decoder fine-tuned on the demo's
synthetic radiographs, as configs/litemedsam_synthetic.py, but half of the training prompts are
shaped like the pipeline's map-derived box (`mskjax.train.sam.peak_like_boxes`, the settings of
configs/sam_synthetic_map_prompts.py: a box 0.2-0.5 of the image's width and height around a
lesion pixel moved by up to 3% of the image, slid inside it); the other half are the usual tight,
jittered ground-truth boxes (what the pipeline's refine pass sends). The embeddings are the same
as configs/litemedsam_synthetic.py's, read from the disk cache when that run made them.
"""
from mskjax.train.config import config_beside, with_map_shaped_prompts


def get_config():
    c = config_beside(__file__, "litemedsam_synthetic.py")
    return with_map_shaped_prompts(c)
