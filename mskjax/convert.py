"""Converts a foreign checkpoint into an mskjax checkpoint directory (see mskjax.checkpoint).

    python -m mskjax.convert --source torchvision --arch resnet50 resnet50-0676ba61.pth OUT_DIR
        [--num_classes 1] [--in_channels 1] [--seed 0]
    python -m mskjax.convert --source timm --arch tf_efficientnet_b3 model.safetensors OUT_DIR
    python -m mskjax.convert --source keras --arch EfficientNetB3 efficientnetb3_notop.h5 OUT_DIR --num_classes 1

--arch is the source's model name (timm: "tf_efficientnet_b3[.tag]"; keras: "EfficientNetB3"); the
checkpoint records our architecture ("efficientnet_b3") with the variant settings that reproduce it.

Nothing is downloaded: INPUT is a file you already have.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mskjax import checkpoint, weights
from mskjax.models import native_resolution
from mskjax.weights import sam as sam_weights
from mskjax.weights.mapping import CheckpointMismatch



def convert(source: str, arch: str, input_path: str | Path, output_dir: str | Path, num_classes: int | None = None,
            in_channels: int = 3, seed: int = 0, overwrite: bool = False) -> dict:
    """Reads `input_path`, writes `output_dir`; returns the metadata written."""
    input_path = Path(input_path)
    if source == "sam":
        variables = sam_weights.load_sam_checkpoint(input_path, arch)
        meta = sam_weights.sam_metadata(arch, 1024)
        meta["source"] = {"format": "segment_anything", "file": input_path.name,
                          "sha256": checkpoint.file_sha256(input_path)}
    else:
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
    p.add_argument("--source", required=True, choices=["torchvision", "timm", "keras", "sam"])
    p.add_argument("--arch", required=True)
    p.add_argument("input")
    p.add_argument("output_dir")
    p.add_argument("--num_classes", type=int, default=None, help="new head with this many logits (fine-tuning)")
    p.add_argument("--in_channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--seed", type=int, default=0, help="seed of a new head")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        meta = convert(a.source, a.arch, a.input, a.output_dir, a.num_classes, a.in_channels, a.seed, a.overwrite)
    except (CheckpointMismatch, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output_dir}: {meta['kind']} {meta['arch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
