"""From a config's `data` section to the records of each split.

Split names the trainer uses: "train" (fit), "valid" (best checkpoint and thresholds), "test"
(reported once). Where a dataset's official validation set is its only held-out set (MURA,
FracAtlas here), "valid" is carved from train (patient-disjoint for MURA, stratified for
FracAtlas) and the official set becomes "test", so no choice is made on the reported split.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from mskjax.data.fracatlas import read_fracatlas, tuning_split
from mskjax.data.mura import patient_disjoint_split, read_mura
from mskjax.data.records import Record

# The share of the official train split carved off as "valid" (MURA, FracAtlas) unless a config
# says otherwise; `mskjax.segment`'s ":tune" split names the same images.
DEFAULT_VALID_FRACTION = 0.15


@dataclasses.dataclass
class Splits:
    records: dict[str, list[Record]]
    skipped: list  # (split, Skipped) pairs from the readers
    description: str


def load_splits(data_config, seed: int = 0) -> Splits:
    name = data_config.dataset
    root = Path(data_config.root)
    parts = [p.strip() for p in str(data_config.body_parts).split(",") if p.strip()] or None
    skipped = []
    if name == "synthetic":
        ensure_synthetic(root, data_config.synthetic_studies, data_config.synthetic_seed,
                         data_config.synthetic_abnormality_scale,
                         data_config.get("synthetic_conspicuity", "realistic"),
                         data_config.get("synthetic_parts", ""))
        records = {}
        for split in ("train", "valid", "test"):
            recs, report = read_mura(root, split, body_parts=parts)
            records[split] = recs
            skipped += [(split, s) for s in _entries(report)]
        return Splits(records, skipped, f"synthetic radiographs at {root}")
    if name == "mura":
        train, r1 = read_mura(root, "train", body_parts=parts)
        test, r2 = read_mura(root, "valid", body_parts=parts)
        train, valid = patient_disjoint_split(train, data_config.valid_fraction, seed, name="valid")
        test = [dataclasses.replace(r, split="test") for r in test]
        skipped += [("train", s) for s in _entries(r1)] + [("test", s) for s in _entries(r2)]
        return Splits({"train": train, "valid": valid, "test": test}, skipped,
                      f"MURA at {root}: valid carved from train (patient-disjoint), official valid as test")
    if name == "fracatlas":
        recs, report = read_fracatlas(root)
        train = [r for r in recs if r.split == "train"]
        test = [dataclasses.replace(r, split="test") for r in recs if r.split == "valid"]
        train, valid = tuning_split(train, data_config.valid_fraction, seed, name="valid")
        skipped += [("all", s) for s in _entries(report)]
        return Splits({"train": train, "valid": valid, "test": test}, skipped,
                      f"FracAtlas at {root}: valid = tuning split carved from train, official valid as test")
    raise ValueError(f"config.data.dataset: unknown dataset {name!r}")


def tuning_records(dataset: str, root: str | Path, valid_fraction: float = DEFAULT_VALID_FRACTION,
                   seed: int = 0) -> Splits:
    """The splits `mskjax.train` makes of a MURA or FracAtlas folder with its default data settings
    (valid carved from train with `valid_fraction` and `seed`): its "valid" split holds images the
    classifier never trained on, for choosing thresholds."""
    if dataset not in ("mura", "fracatlas"):
        raise ValueError(f"a tuning split is carved from MURA or FracAtlas, not {dataset!r}")
    data = SimpleNamespace(dataset=dataset, root=str(root), body_parts="", valid_fraction=valid_fraction)
    return load_splits(data, seed=seed)


def ensure_synthetic(root: Path, studies: int, seed: int, abnormality_scale: float = 1.0,
                     conspicuity: str = "realistic", parts: str = "") -> None:
    """Generates the synthetic dataset at `root` unless one with these settings is there.

    Runs the generator in a fresh process: it forks worker processes, which is unsafe in a
    process whose JAX runtime threads have started."""
    if not (root / "synthetic.json").is_file():
        print(f"generating synthetic radiographs in {root} ({studies} studies, seed {seed}) ...", flush=True)
    out = subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(root), "--studies",
                          str(studies), "--seed", str(seed), "--abnormality-scale", repr(float(abnormality_scale)),
                          "--conspicuity", str(conspicuity), "--parts", str(parts)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"synthetic data generation into {root} failed:\n{out.stderr[-2000:]}")


def _entries(report):
    if report is None:
        return []
    for attr in ("entries", "skipped", "items"):
        if hasattr(report, attr):
            return list(getattr(report, attr))
    return list(report) if hasattr(report, "__iter__") else []
