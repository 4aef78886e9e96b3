"""Radiograph decoding and dataset readers.

- `images.decode_image`: any JPEG / PNG / DICOM file -> `Decoded` (float32 (H, W) in [0, 1],
  displayed frame); `images.read_yolo_boxes`.
- `dicom.decode_dicom`: the DICOM display pipeline; `decoded`: what every decoder returns.
- `splits.load_splits`: a data config -> the records of each split; `synthetic`: the synthetic world.
- `records.Record` / `records.SkipReport`: what readers yield and what they skipped.
- `mura.read_mura`, `mura.patient_disjoint_split`; `fracatlas.read_fracatlas`, `fracatlas.tuning_split`.
"""
from mskjax.data.dicom import decode_dicom
from mskjax.data.fracatlas import read_fracatlas, tuning_split
from mskjax.data.images import Decoded, ImageDecodeError, decode_image, read_yolo_boxes
from mskjax.data.mura import BODY_PARTS, patient_disjoint_split, read_mura
from mskjax.data.records import Record, SkipReport, Skipped

__all__ = [
    "BODY_PARTS",
    "Decoded",
    "ImageDecodeError",
    "Record",
    "SkipReport",
    "Skipped",
    "decode_dicom",
    "decode_image",
    "patient_disjoint_split",
    "read_fracatlas",
    "read_mura",
    "read_yolo_boxes",
    "tuning_split",
]

