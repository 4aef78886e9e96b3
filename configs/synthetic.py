"""The built-in default: a ResNet18 at 128 px on synthetic forearm and humerus radiographs (no downloads).

    python -m mskjax.train --config configs/synthetic.py --workdir runs/synthetic

Generates `data/synthetic_arm` if absent: 600 studies (seed 0) of the forearm and the humerus
(`data.synthetic_parts`), half of them abnormal - fractures, metal hardware or lytic lesions - drawn
three times their default size (`data.synthetic_abnormality_scale`) and conspicuous
(`data.synthetic_conspicuity = "high"`: every fracture displaced or a clean break, every lesion deep
and through the cortex). Then trains a one-channel ResNet18 from scratch for 16 epochs (10 until
2026-12-07) on
per-image standardised inputs, left-right flipped and shifted (since 2026-12-07), keeps the best checkpoint by validation study kappa
(runs/synthetic/best) and reports the test split, with each abnormality type's AUROC against the
normal cases.

Result on this project's 2-core CPU machine, idle, 2026-11-26 (README, "The default job"): test
study AUROC 0.983 (bootstrap 95% CI 0.963-0.998), kappa 0.888, image AUROC 0.953, in 7 min 48 s
wall for the whole command on a fresh checkout (data generation included); with --config.seed=1
0.984 / 0.887. Per type, study AUROC against the normal studies: fracture 0.989, hardware 0.974,
lesion 0.990 (seed 0). Target (>= 0.95 within 10 minutes): met.

Localization (README "Localization of the default classifier", 2026-12-05, the same run re-made at
load 3-6: test study AUROC 0.977): layer2 LayerCAM, the map chosen on valid (eval.cam_method /
eval.cam_layer), puts its peak within 15 px of the evidence mask on 0.777 of the 130 abnormal test
images (chance 0.149) and of the lesion mask on 0.685 (chance 0.091); the trainer prints this after
the test table. Since 2026-12-06 the map is the mean over the image and its three flips
(eval.map_flips "hv", `mskjax.cam.flip_mean`): on the demo's run of this config (2026-12-06's
slower machine, test study AUROC 0.973) 0.862 / 0.777 against evidence / lesion on test (0.769 /
0.654 without), 0.857 / 0.807 on valid (README "Flipped maps and a mirrored view for SAM").

Flips and shifts (2026-12-07, README "A training recipe against position"): over seeds 0 / 1 / 2
on an Intel Xeon, valid lesion pointing at 15 px 0.538 / 0.866 / 0.840 without them, 0.807 / 0.857 /
0.882 with them; test 0.808 / 0.815 / 0.869 against the lesion and 0.862 / 0.862 / 0.908 against the
evidence, study AUROC 0.969 / 1.000 / 0.980, 6 min 52 s to 8 min 11 s idle.

16 epochs (2026-12-07, later, README "Sixteen epochs"): after that day's change to the trainer's CPU
numerics, the same recipe at 10 epochs pointed at the lesion within 15 px on 0.521 / 0.487 / 0.916 of
valid (seeds 0 / 1 / 2; test 0.400 / 0.531 / 0.831): where its map lands was a draw. Trained 16
epochs (the trainer's CPU change made room in the 10-minute budget), 0.891 / 0.647 / 0.899 on valid
and 0.808 / 0.723 / 0.854 on test (evidence 0.854 / 0.823 / 0.900), each run meeting issue 18's test
targets, in 6 min 16 s to 6 min 45 s (`docs/train_step_cpu_2026-12-07/epochs16_seeds.sh`).

Why this data and not the full synthetic set: on all seven body parts with the realistic mix
(hairline and undisplaced fractures, shallow lesions), the same 10-minute budget reached test study
AUROC 0.812 (abnormalities x3, 3 epochs) and stays at chance at the default size; a from-scratch
CNN on ~10,000 image passes does not learn that task. Set `data.synthetic_parts=""` and
`data.synthetic_conspicuity=realistic` (and another `data.root`) for the harder set.
"""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.model.arch = "resnet18"
    c.model.in_channels = 1
    c.data.dataset = "synthetic"
    c.data.root = "data/synthetic_arm"
    c.data.image_size = 128
    c.data.normalization = "per_image"  # exposure and contrast vary per film: standardise each image
    c.data.synthetic_studies = 600
    c.data.synthetic_parts = "XR_FOREARM,XR_HUMERUS"
    c.data.synthetic_abnormality_scale = 3.0
    c.data.synthetic_conspicuity = "high"
    # Left-right flips and shifts of up to 8% of the side, nothing else: a network that sees the
    # abnormality at other places in the frame cannot tie its evidence to one (issue 18: the maps of
    # the unaugmented job pointed at the lesion within 15 px on 0.538 / 0.866 / 0.840 of valid over
    # seeds 0 / 1 / 2, with this 0.807 / 0.857 / 0.882; study AUROC stays >= 0.95). Rotation, zoom
    # and the photometric changes cost too much classification in this budget (README).
    c.data.augment = True
    c.data.augmentation.flip_prob = 0.5
    c.data.augmentation.rotate_prob = 0.0
    c.data.augmentation.scale_prob = 0.0
    c.data.augmentation.translate_prob = 1.0
    c.data.augmentation.max_translate = 0.08
    c.data.augmentation.gamma_prob = 0.0
    c.data.augmentation.contrast_prob = 0.0
    c.data.augmentation.brightness_prob = 0.0
    c.train.batch_size = 32
    # 16, not 10: the map's pointing was a draw at 10 epochs (0.49-0.92 of valid over three seeds),
    # 0.65-0.90 at 16, within the 10-minute budget (docstring).
    c.train.epochs = 16
    c.train.learning_rate = 2e-3
    c.train.weight_decay = 1e-4
    c.train.warmup_epochs = 1.5
    c.eval.batch_size = 64
    # The map whose peak prompts SAM, chosen on valid among those README "Localization of the
    # default classifier" lists: LayerCAM on layer2 (16 x 16 cells at 128 px) points at the
    # evidence; layer4's Grad-CAM (4 x 4) does not.
    c.eval.cam_method = "layer_cam"
    c.eval.cam_layer = "layer2"
    c.eval.map_flips = "hv"  # the map as the mean over flips: valid pointing at 15 px 0.647 -> 0.807 (lesion)
    return c
