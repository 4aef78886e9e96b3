"""configs/sam_synthetic.py, also trained on the prompts a class activation map gives (the demo's SAM).

    python -m mskjax.train --config configs/sam_synthetic_map_prompts.py --workdir runs/sam_map_prompts

Half of the training prompts are shaped like the pipeline's map-derived box
(`mskjax.train.sam.peak_like_boxes`): a box 0.2-0.5 of the image's width and height around a pixel
of the lesion moved by up to 3% of the image, slid inside it; the other half are the usual tight,
jittered ground-truth boxes (so the pipeline's refine pass, which re-prompts with the tight box of
the first mask, gets what it was trained on). Everything else is configs/sam_synthetic.py.

Measured on the demo's data (runs/demo/data, 7 epochs as the demo runs it; 2026-12-05, this
2-core CPU shared with other jobs, load 3-5): 18 min 36 s; valid Dice with ground-truth boxes 0.748
(0.776 for configs/sam_synthetic.py), test 0.737 (0.774). With the demo's classifier (layer2
LayerCAM) and the box the valid split chose (`segment --box-side 64 --refine 1`), Dice from
map-derived prompts on the 130 abnormal test images: 0.288 (configs/sam_synthetic.py with its
default square: 0.200); 0.350 when every image gets its prompt whatever the classifier said
(0.244). Share 0.75 with boxes of 0.3-0.6 (9 epochs) did no better on valid (0.317 against 0.322).
"""
from mskjax.train.config import config_beside, with_map_shaped_prompts


def get_config():
    c = config_beside(__file__, "sam_synthetic.py")
    return with_map_shaped_prompts(c)
