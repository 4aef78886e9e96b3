"""TensorFlow Datasets builders for MURA, FracAtlas and the synthetic MURA-layout set, with no TensorFlow.

    from mskjax.data import tfds_builders as tb
    builder = tb.build("synthetic_mura", data_dir="~/tfds", source_dir="/data/synthetic")
    source = tb.data_source("synthetic_mura", "~/tfds", "train")   # random access, numpy dicts
    source[0]["image"]                                              # uint8 (H, W)

Importing this module registers the builders with TFDS, so ``tfds.builder("mura", data_dir=...)``
and ``tfds.data_source("synthetic_mura", split="train", data_dir=...)`` find prepared copies too.

Builders: ``mura`` (MURA-v1.1, manual download), ``fracatlas`` (the FracAtlas development folder,
see ../shared/data/README.md) and ``synthetic_mura`` (``python -m mskjax.data.synthetic``). None
downloads anything: the source folder is the TFDS *manual dir* (``DownloadConfig(manual_dir=...)``,
which `build` passes).

Why it works without TensorFlow: TFDS writes and reads the ``array_record`` format in pure Python,
and every feature here is a `tfds.features.Tensor`, `ClassLabel` or `Text`, whose numpy encoders
and decoders need no TensorFlow. `tfds.features.Image` is avoided because its PNG encoder runs
``tf.io.encode_png``. Images and masks, whose height and width both vary, are stored as raw pixel
bytes compressed with zlib (``Tensor(..., encoding="zlib")``; TFDS requires an encoding when more
than one dimension is unknown). Reading is `builder.as_data_source(split)` (`data_source` here),
which returns numpy arrays; ``as_dataset`` (tf.data) is not available without TensorFlow.

Pixels. `mskjax.data.images.decode_image` gives float32 [0, 1] in the displayed frame (EXIF
applied). We store ``round(x * 255)`` as **uint8** by default: MURA, FracAtlas and the synthetic
set are 8-bit files, whose decoded values are exactly k / 255, so the round trip is lossless and
costs half the space of uint16. A colour source is converted to luma in float, so uint8 rounds it
by at most 0.5 / 255. For genuinely 16-bit sources choose ``image_dtype="uint16"`` (stores
``round(x * 65535)``; an 8-bit value k becomes 257 k exactly). Images whose source had more than 8
significant bits but were stored as uint8 are counted per split in the metadata
(``reduced_precision``), not hidden. Read back with ``image / 255.`` (or ``/ 65535.``).

Optional resize (``max_side``): an image whose longer side exceeds ``max_side`` is downscaled so its
longer side equals ``max_side`` (the shorter one rounded, at least 1 px) with
`mskjax.data.preprocess.resize_image` (Pillow's antialiased bilinear, on the float image before
quantisation); masks go through the same filter and are thresholded at 0.5; boxes are scaled by
(new W / old W, new H / old H). ``original_size`` keeps the displayed (H, W) before resizing, so
boxes can be mapped back.

Features (all builders): ``image`` (H, W) uint8/uint16; ``label`` ClassLabel normal=0 /
abnormal=1; ``path`` the image path relative to the source folder (POSIX); ``original_size`` (2,)
int32 (H, W). MURA-layout builders add ``study``, ``patient`` (Text), ``body_part`` (ClassLabel of
`mskjax.data.mura.BODY_PARTS`), ``view`` (int32, 0-based). ``synthetic_mura`` and ``fracatlas``
add ``mask`` (H, W) uint8 with 1 inside any abnormality, 0 elsewhere (all zeros when the image has
none), ``boxes`` (N, 4) float32 (x0, y0, x1, y1) in pixels of the stored image (pixel i covers
[i, i+1)), and ``box_types`` (N,) int32 indices into `BOX_TYPES`. ``fracatlas`` also has
``regions`` (5,) bool in `mskjax.data.fracatlas.REGIONS` order, ``views`` (3,) bool in ``VIEWS``
order, ``hardware``, ``multiscan`` (bool), ``fracture_count`` (int32) and ``body_part`` (ClassLabel
of `FRACATLAS_BODY_PARTS`).

Order: examples are stored in the reader's order (CSV order); shuffling is disabled in the builder
because consumers shuffle per epoch with their own seed. Splits the source has but that hold no
readable image are left out (TFDS cannot write an empty split) and listed in the metadata.

Cost (2-core machine, shared): all 2,138 FracAtlas images (long side <= 512) build in about 70 s
into 130 MB, most of it TFDS's zlib compression of the pixels; reading takes about 6 ms per example.

Bad input: rows the reader skips (missing file, bad label, bad box, ...) and images or masks that
fail to decode are skipped, logged (one warning per split with the counts) and written to the
dataset's ``metadata.json``: per split ``records``, ``written``, ``skipped``, ``skipped_by_kind``,
``reduced_precision``; every item in ``skipped_items`` as [split, where, kind, reason]. Read them
back with `skip_report`. Nothing is silently dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mskjax.data import fracatlas as _fracatlas
from mskjax.data import mura as _mura
from mskjax.data.images import decode_image
from mskjax.data.preprocess import resize_image
from mskjax.data.records import Record, SkipReport

__all__ = [
    "BOX_TYPES",
    "BUILDERS",
    "FRACATLAS_BODY_PARTS",
    "LABEL_NAMES",
    "Fracatlas",
    "Mura",
    "RadiographConfig",
    "SyntheticMura",
    "build",
    "data_source",
    "get_builder",
    "skip_report",
]

_log = logging.getLogger(__name__)

LABEL_NAMES = ("normal", "abnormal")
BOX_TYPES = _mura.BOX_TYPES  # ("fracture", "hardware", "lesion"); FracAtlas boxes are all "fracture"
FRACATLAS_BODY_PARTS = _fracatlas.REGIONS + ("unknown",)
_IMAGE_DTYPES = {"uint8": (np.uint8, 255.0), "uint16": (np.uint16, 65535.0)}
_CONFIG_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(eq=False)
class RadiographConfig(tfds.core.BuilderConfig):
    """How a builder stores its images. The config name names the folder the data go to.

    Attributes:
      max_side: downscale images whose longer side exceeds this (pixels); None keeps original size.
      image_dtype: "uint8" (default, lossless for 8-bit sources) or "uint16".
      limit: keep only the first `limit` records of each split, in reader order (for tests and
        smoke runs); None keeps all.
      body_parts: MURA-layout builders only: keep these `BODY_PARTS` (e.g. ("XR_WRIST",)); None = all.
    """

    max_side: int | None = None
    image_dtype: str = "uint8"
    limit: int | None = None
    body_parts: tuple[str, ...] | None = None

    def __post_init__(self):
        if not _CONFIG_NAME_RE.match(self.name or ""):
            raise ValueError(f"config name {self.name!r} must match {_CONFIG_NAME_RE.pattern}")
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 1):
            raise ValueError(f"max_side must be a positive int or None, got {self.max_side!r}")
        if self.image_dtype not in _IMAGE_DTYPES:
            raise ValueError(f"image_dtype must be one of {sorted(_IMAGE_DTYPES)}, got {self.image_dtype!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        if self.body_parts is not None:
            parts = (self.body_parts,) if isinstance(self.body_parts, str) else tuple(self.body_parts)
            unknown = sorted(set(parts) - set(_mura.BODY_PARTS))
            if unknown:
                raise ValueError(f"unknown body part(s) {unknown}; known: {list(_mura.BODY_PARTS)}")
            self.body_parts = tuple(sorted(set(parts)))

    def settings(self) -> dict[str, Any]:
        """The storage settings as a JSON-able dict (what the metadata records)."""
        return {
            "max_side": self.max_side,
            "image_dtype": self.image_dtype,
            "limit": self.limit,
            "body_parts": list(self.body_parts) if self.body_parts is not None else None,
        }


_DEFAULT_SETTINGS = RadiographConfig(name="default").settings()


def _config_name(settings: Mapping[str, Any]) -> str:
    """A folder-safe name that differs whenever the settings differ: 'default' for the defaults."""
    if dict(settings) == _DEFAULT_SETTINGS:
        return "default"
    parts = []
    if settings["max_side"] is not None:
        parts.append(f"side{settings['max_side']}")
    if settings["image_dtype"] != "uint8":
        parts.append(settings["image_dtype"])
    if settings["body_parts"] is not None:
        parts.append("_".join(p.removeprefix("XR_").lower() for p in settings["body_parts"]))
    if settings["limit"] is not None:
        parts.append(f"first{settings['limit']}")
    return "_".join(parts)


# --------------------------------------------------------------------------------------------
# Shared machinery


class _RadiographBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common reading, decoding, skipping and metadata; subclasses say which reader and features."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [RadiographConfig(name="default", version=tfds.core.Version("1.0.0"))]
    DEFAULT_CONFIG_NAME = "default"
    SPLITS: tuple[str, ...] = ()
    HAS_GROUND_TRUTH = False  # masks and boxes
    # Where the builder's code lives (TFDS looks for a checksums file beside it; there is none).
    # Given directly because TFDS 4.9.10 otherwise computes it through `importlib_resources`, a
    # package it does not declare and that is not installed.
    code_path = epath.Path(__file__)

    # -- subclass hooks --------------------------------------------------------------------

    def _read(self, source: str, split: str) -> tuple[list[Record], SkipReport]:
        raise NotImplementedError

    def _splits_in(self, source: str) -> list[str]:
        return list(self.SPLITS)

    def _extra_features(self) -> dict[str, Any]:
        return {}

    def _extra_example(self, record: Record) -> dict[str, Any]:
        return {}

    # -- TFDS interface --------------------------------------------------------------------

    @property
    def _config(self) -> RadiographConfig:
        return self.builder_config

    def _info(self) -> tfds.core.DatasetInfo:
        dtype = _IMAGE_DTYPES[self._config.image_dtype][0]
        features = {
            "image": tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding="zlib"),
            "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
            "path": tfds.features.Text(),
            "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }
        if self.HAS_GROUND_TRUTH:
            features["mask"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")
            features["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
            features["box_types"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        features.update(self._extra_features())
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().split("\n")[0],
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        source = os.path.abspath(os.fspath(dl_manager.manual_dir))
        meta = self.info.metadata
        meta.clear()
        meta.update(
            source_dir=source,
            settings=self._config.settings(),
            box_types=list(BOX_TYPES),
            splits={},
            skipped_items=[],
            empty_splits=[],
        )
        generators = {}
        for split in self._splits_in(source):
            records, report = self._read(source, split)
            n_read = len(records)
            if self._config.limit is not None:
                records = records[: self._config.limit]
            meta["splits"][split] = {
                "records": n_read,
                "kept_by_limit": len(records),
                "written": 0,
                "skipped": 0,
                "skipped_by_kind": {},
                "reduced_precision": 0,
            }
            for item in report:
                self._note_skip(split, item.where, item.kind, item.reason)
            if not records:
                _log.warning("%s: split %r has no readable image; left out of the dataset", self.name, split)
                meta["empty_splits"].append(split)
                del meta["splits"][split]
                continue
            generators[split] = self._generate_examples(source=source, split=split, records=records)
        if not generators:
            raise ValueError(f"{self.name}: no readable image in any split of {source}")
        return generators

    def _generate_examples(self, source: str, split: str, records: Sequence[Record]) -> Iterator[tuple[int, dict]]:
        stats = self.info.metadata["splits"][split]
        for index, record in enumerate(records):
            try:
                example, reduced = self._example(source, record)
            except (OSError, ValueError) as e:  # ImageDecodeError is a ValueError; FileNotFoundError an OSError
                self._note_skip(split, record.path, "decode_error", str(e))
                continue
            stats["written"] += 1
            stats["reduced_precision"] += int(reduced)
            yield index, example  # int keys + disable_shuffling: stored in reader order
        if stats["skipped"]:
            _log.warning(
                "%s/%s: wrote %d images, skipped %d (%s); see metadata.json",
                self.name, split, stats["written"], stats["skipped"],
                ", ".join(f"{k}={n}" for k, n in stats["skipped_by_kind"].items()),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _note_skip(self, split: str, where: str, kind: str, reason: str) -> None:
        meta = self.info.metadata
        meta["skipped_items"].append([split, os.fspath(where), kind, reason])
        stats = meta["splits"].get(split)
        if stats is not None:
            stats["skipped"] += 1
            stats["skipped_by_kind"][kind] = stats["skipped_by_kind"].get(kind, 0) + 1

    def _example(self, source: str, record: Record) -> tuple[dict[str, Any], bool]:
        """One record -> (feature dict, whether >8-bit precision was rounded to uint8)."""
        decoded = decode_image(record.path)
        image = decoded.image
        h0, w0 = image.shape
        h, w = _fit(h0, w0, self._config.max_side)
        dtype, scale = _IMAGE_DTYPES[self._config.image_dtype]
        if (h, w) != (h0, w0):
            image = _resize(image, h, w)
        example: dict[str, Any] = {
            "image": np.round(np.clip(image, 0.0, 1.0) * scale).astype(dtype),
            "label": record.label,
            "path": os.path.relpath(record.path, source).replace(os.sep, "/"),
            "original_size": np.array([h0, w0], np.int32),
        }
        if self.HAS_GROUND_TRUTH:
            mask = np.zeros((h0, w0), np.float32)
            if record.mask_path is not None:
                m = decode_image(record.mask_path).image
                if m.shape != (h0, w0):
                    raise ValueError(
                        f"mask {record.mask_path} is {m.shape[1]}x{m.shape[0]} (WxH) but its image is {w0}x{h0}"
                    )
                mask = (m > 0).astype(np.float32)  # 0/255 files: any non-zero is inside
            if (h, w) != (h0, w0):
                mask = _resize(mask, h, w)
                mask = (mask >= 0.5).astype(np.float32)
            boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
            boxes = boxes * np.array([w / w0, h / h0, w / w0, h / h0], np.float32)
            unknown = sorted(set(record.box_types) - set(BOX_TYPES))
            if unknown:
                raise ValueError(f"{record.path}: unknown box type(s) {unknown}; known: {list(BOX_TYPES)}")
            example["mask"] = mask.astype(np.uint8)
            example["boxes"] = boxes
            example["box_types"] = np.array([BOX_TYPES.index(t) for t in record.box_types], np.int32)
        example.update(self._extra_example(record))
        reduced = decoded.bits_stored > 8 and self._config.image_dtype == "uint8"
        return example, reduced


def _fit(h: int, w: int, max_side: int | None) -> tuple[int, int]:
    """(H, W) after scaling the longer side down to max_side (unchanged when it already fits)."""
    if max_side is None or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    if h >= w:
        return max_side, max(1, int(round(w * s)))
    return max(1, int(round(h * s))), max_side


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:

    return resize_image(image, h, w)


class _MuraLayoutBuilder(_RadiographBuilder, skip_registration=True):
    def _read(self, source: str, split: str) -> tuple[list[Record], SkipReport]:
        return _mura.read_mura(source, split, body_parts=self._config.body_parts)

    def _extra_features(self) -> dict[str, Any]:
        return {
            "study": tfds.features.Text(),
            "patient": tfds.features.Text(),
            "body_part": tfds.features.ClassLabel(names=list(_mura.BODY_PARTS)),
            "view": np.int32,
        }

    def _extra_example(self, record: Record) -> dict[str, Any]:
        return {"study": record.study, "patient": record.patient, "body_part": record.body_part, "view": record.view}


# --------------------------------------------------------------------------------------------
# The builders


class Mura(_MuraLayoutBuilder):
    """MURA-v1.1 musculoskeletal radiographs (Stanford ML Group), read from a manual download."""

    name = "mura"
    SPLITS = ("train", "valid")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Request MURA-v1.1 from https://stanfordmlgroup.github.io/competitions/mura/ and pass the
    unpacked folder (the one holding train_image_paths.csv, train_labeled_studies.csv,
    valid_image_paths.csv, valid_labeled_studies.csv, train/ and valid/) as the manual dir.
    """


class SyntheticMura(_MuraLayoutBuilder):
    """Synthetic radiographs in the MURA layout with masks and boxes (python -m mskjax.data.synthetic)."""

    name = "synthetic_mura"
    SPLITS = ("train", "valid", "test")
    HAS_GROUND_TRUTH = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Generate the data with `python -m mskjax.data.synthetic --out DIR --studies N --seed S` and pass
    DIR as the manual dir.
    """


class Fracatlas(_RadiographBuilder):
    """FracAtlas fracture radiographs (Abedeen et al. 2023, CC BY 4.0), development part."""

    name = "fracatlas"
    SPLITS = ("train", "valid")
    HAS_GROUND_TRUTH = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Pass the FracAtlas folder holding dataset.csv, annotations.json, images/ and masks/ (the layout
    described in mskjax.data.fracatlas) as the manual dir.
    """

    def _read(self, source: str, split: str) -> tuple[list[Record], SkipReport]:
        if self._config.body_parts is not None:
            raise ValueError("fracatlas: body_parts selects MURA body parts and does not apply here")
        return _fracatlas.read_fracatlas(source, splits=[split])

    def _extra_features(self) -> dict[str, Any]:
        n_reg, n_view = len(_fracatlas.REGIONS), len(_fracatlas.VIEWS)
        return {
            "image_id": tfds.features.Text(),
            "body_part": tfds.features.ClassLabel(names=list(FRACATLAS_BODY_PARTS)),
            "regions": tfds.features.Tensor(shape=(n_reg,), dtype=np.bool_),
            "views": tfds.features.Tensor(shape=(n_view,), dtype=np.bool_),
            "hardware": np.bool_,
            "multiscan": np.bool_,
            "fracture_count": np.int32,
        }

    def _extra_example(self, record: Record) -> dict[str, Any]:
        x = record.extra
        return {
            "image_id": os.path.basename(record.path),
            "body_part": record.body_part,
            "regions": np.array([bool(x[k]) for k in _fracatlas.REGIONS]),
            "views": np.array([bool(x[k]) for k in _fracatlas.VIEWS]),
            "hardware": bool(x["hardware"]),
            "multiscan": bool(x["multiscan"]),
            "fracture_count": int(x["fracture_count"]),
        }


BUILDERS: dict[str, type[_RadiographBuilder]] = {
    "mura": Mura,
    "fracatlas": Fracatlas,
    "synthetic_mura": SyntheticMura,
}


# --------------------------------------------------------------------------------------------
# Convenience


def get_builder(name: str, data_dir: str | os.PathLike, **settings) -> _RadiographBuilder:
    """The builder `name` ("mura", "fracatlas", "synthetic_mura") for `data_dir`, not prepared.

    `settings` are `RadiographConfig` fields (max_side, image_dtype, limit, body_parts); the config
    name (and so the folder ``data_dir/<name>/<config>/<version>``) is derived from them.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; known: {sorted(BUILDERS)}")
    unknown = sorted(set(settings) - set(_DEFAULT_SETTINGS))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; known: {sorted(_DEFAULT_SETTINGS)}")
    cls = BUILDERS[name]
    probe = RadiographConfig(name="probe", **settings)  # validates and normalises (body_parts)
    config_name = _config_name(probe.settings())
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if config_name == "default":
        return cls(data_dir=data_dir, config="default")
    config = dataclasses.replace(probe, name=config_name, version=cls.VERSION)
    return cls(data_dir=data_dir, config=config)


def build(
    name: str,
    data_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    **settings,
) -> _RadiographBuilder:
    """Prepare dataset `name` from `source_dir` into `data_dir` as array_record; return the builder.

    An existing prepared copy with the same settings is reused unless `overwrite`. Raises
    FileNotFoundError when `source_dir` is not a folder; reader-level faults (a missing CSV, a
    malformed annotations.json) raise the reader's error. Skipped items go to the metadata.
    """
    source = os.path.abspath(os.path.expanduser(os.fspath(source_dir)))
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{name}: source folder {source} does not exist")
    builder = get_builder(name, data_dir, **settings)
    if overwrite and builder.data_path.exists():
        # A builder made over prepared data has its info frozen from disk (TFDS then refuses to
        # set the file format), so delete the old copy and start from a fresh builder.
        shutil.rmtree(os.fspath(builder.data_path))
        builder = get_builder(name, data_dir, **settings)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=source,
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            try_download_gcs=False,
        ),
    )
    return builder


def data_source(name: str, data_dir: str | os.PathLike, split: str, **settings):
    """Random-access source of numpy example dicts for a prepared split (`len`, `[i]`, `__getitems__`).

    Text features come back as bytes, ClassLabels as ints. Raises FileNotFoundError if the dataset
    with these settings has not been prepared in `data_dir`.
    """
    builder = get_builder(name, data_dir, **settings)
    if not builder.data_path.exists():
        raise FileNotFoundError(f"{name}: no prepared dataset at {builder.data_path}; run build() first")
    return builder.as_data_source(split)


def skip_report(builder: _RadiographBuilder, split: str | None = None) -> SkipReport:
    """The items a prepared dataset skipped (reader skips and decode failures), from its metadata.

    `split` restricts to one split; None gives all. Each item's `where` is a path or "csv:line".
    """
    report = SkipReport()
    for item_split, where, kind, reason in builder.info.metadata.get("skipped_items", []):
        if split is None or item_split == split:
            report.add(where, kind, f"[{item_split}] {reason}")
    return report
