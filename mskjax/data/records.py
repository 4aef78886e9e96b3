"""The record every dataset reader yields and the loader consumes, and the report of skipped entries.

A `Record` names one image and its ground truth; it holds no pixels. Boxes are (x0, y0, x1, y1)
float pixels in the frame of the *original displayed image* (after EXIF orientation, before any
resize), pixel i covering [i, i+1).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Record", "Skipped", "SkipReport"]

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a dataset.

    Attributes:
      path: absolute path of the image file.
      label: 0 normal / 1 abnormal. For MURA this is the label of the image's study.
      study: id unique within the dataset (MURA: "<split>/<XR_PART>/<patient>/<studyN_...>").
      patient: patient id (FracAtlas has none: its readers use the image id).
      body_part: e.g. "XR_WRIST" (MURA) or "hand" (FracAtlas).
      view: index of the image within its study (0-based).
      split: "train", "valid", "test", or a carved split such as "tune".
      mask_path: absolute path of a 0/255 PNG mask in the displayed-image frame, or None.
      boxes: tuple of (x0, y0, x1, y1) floats, displayed-image pixels, x0 <= x1 and y0 <= y1.
      box_types: one string per box ("fracture", "hardware", "lesion", ...).
      evidence_path: absolute path of a 0/255 PNG in the displayed-image frame marking the pixels
        the abnormalities changed (synthetic data: where the image differs from its render without
        them; mask_path marks their own extent), or None.
      extra: dataset-specific fields (FracAtlas region / view flags ...). Not part of hashing.
    """

    path: str
    label: int
    study: str
    patient: str
    body_part: str
    view: int
    split: str
    mask_path: str | None = None
    boxes: tuple[Box, ...] = ()
    box_types: tuple[str, ...] = ()
    evidence_path: str | None = None  # after box_types: positional construction keeps working
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        where = f"Record({self.path!r})"
        if not isinstance(self.path, str) or not os.path.isabs(self.path):
            raise ValueError(f"{where}: path must be an absolute str")
        if self.label not in (0, 1) or isinstance(self.label, bool):
            raise ValueError(f"{where}: label must be the int 0 or 1, got {self.label!r}")
        if not isinstance(self.view, int) or self.view < 0:
            raise ValueError(f"{where}: view must be an int >= 0, got {self.view!r}")
        if self.mask_path is not None and not os.path.isabs(self.mask_path):
            raise ValueError(f"{where}: mask_path must be absolute, got {self.mask_path!r}")
        if self.evidence_path is not None and not os.path.isabs(self.evidence_path):
            raise ValueError(f"{where}: evidence_path must be absolute, got {self.evidence_path!r}")
        boxes = tuple(tuple(float(v) for v in b) for b in self.boxes)
        for b in boxes:
            if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[0] > b[2] or b[1] > b[3]:
                raise ValueError(f"{where}: box {b} is not finite (x0, y0, x1, y1) with x0 <= x1, y0 <= y1")
        box_types = tuple(str(t) for t in self.box_types)
        if len(box_types) != len(boxes):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(box_types)} box_types")
        object.__setattr__(self, "label", int(self.label))
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "box_types", box_types)
        object.__setattr__(self, "extra", dict(self.extra))


@dataclasses.dataclass(frozen=True)
class Skipped:
    """One entry a reader left out: `where` (a path, a CSV row "file:line", an annotation id),
    `kind` (a short category used for counting, e.g. "missing_file"), `reason` (a sentence)."""

    where: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: [{self.kind}] {self.reason}"


@dataclasses.dataclass
class SkipReport:
    """What a dataset run skipped and why. Readers append; callers print `summary()` or inspect `items`."""

    items: list[Skipped] = dataclasses.field(default_factory=list)

    def add(self, where: str | os.PathLike, kind: str, reason: str) -> None:
        self.items.append(Skipped(os.fspath(where), kind, reason))

    def extend(self, other: "SkipReport | Iterable[Skipped]") -> None:
        self.items.extend(other.items if isinstance(other, SkipReport) else other)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def counts(self) -> dict[str, int]:
        """Number of skipped entries per kind, most frequent first."""
        return dict(collections.Counter(s.kind for s in self.items).most_common())

    def kinds(self) -> set[str]:
        return {s.kind for s in self.items}

    def summary(self, limit: int = 20) -> str:
        """Human-readable report: counts per kind, then up to `limit` entries."""
        if not self.items:
            return "nothing skipped"
        head = f"{len(self.items)} skipped: " + ", ".join(f"{k}={n}" for k, n in self.counts().items())
        lines = [head] + [f"  {s}" for s in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more")
        return "\n".join(lines)
