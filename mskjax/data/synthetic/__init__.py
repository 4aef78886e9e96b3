"""The synthetic world: procedural radiographs with exact ground truth, written in the MURA layout.

    python -m mskjax.data.synthetic --out DIR --studies N --seed S

render.py draws densities and films, anatomy.py the seven body parts, lesions.py the abnormalities
(fractures, hardware, lytic lesions), dataset.py plans studies, renders them (each abnormal view
also without its abnormalities, for its evidence mask) and writes the folder.
"""
from mskjax.data.synthetic.dataset import (DEFAULT_SIZE_RANGE, DEFAULT_SPLITS, PARTS, TYPES, VERSION,
                                           SyntheticDatasetError, evidence_mask, evidence_outside, generate,
                                           main, mask_box, plan_studies, render_study, render_view, study_rng,
                                           unit_mm)

__all__ = ["DEFAULT_SIZE_RANGE", "DEFAULT_SPLITS", "PARTS", "TYPES", "VERSION", "SyntheticDatasetError",
           "evidence_mask", "evidence_outside", "generate", "main", "mask_box", "plan_studies", "render_study",
           "render_view", "study_rng", "unit_mm"]
