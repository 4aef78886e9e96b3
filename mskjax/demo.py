"""`python -m mskjax.demo [--workdir runs/demo]`: the whole method on a fresh machine, no downloads.

Stages, each a subprocess of this Python (so a failure names its stage), each skipped when its
output already exists (so a rerun continues where the last one stopped):

  data        synthetic radiographs with masks and boxes     WORKDIR/data/synthetic.json
  classifier  python -m mskjax.train --config configs/synthetic.py
                                                              WORKDIR/classifier/best (+ results.json)
  sam         python -m mskjax.train --config configs/sam_synthetic_classifier_maps.py
                  --config.data.map_prompts=WORKDIR/classifier/best  WORKDIR/sam/best
              (trained on that classifier's own maps, with the map and box the segment stage uses)
  segment     python -m mskjax.segment on the held-out test split
                                                              WORKDIR/segment/metrics.json

then prints study AUROC and kappa, the pointing game, and Dice with ground-truth and CAM boxes.
Each stage's output is also logged to WORKDIR/logs/STAGE.log. When configs/sam_synthetic.py does
not exist (SAM fine-tuning not available in this checkout) the demo says so and stops after the
classifier.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
CLASSIFIER_CONFIG = CONFIGS / "synthetic.py"
SAM_CONFIG = CONFIGS / "sam_synthetic_classifier_maps.py"
# The segment stage's prompt (issue 18, part 4), chosen on the demo's valid split with the SAM
# trained on simulated map-shaped boxes (2026-12-05, docs/prompts_2026-12-05/valid_sweep.json): the
# peak box 64 px at the classifier's 128 px input, i.e. half its side (swept 28.6 / 40 / 56 / 64 / 72
# px with one refine pass: Dice 0.236 / 0.273 / 0.314 / 0.322 / 0.321), then one refine pass (SAM
# re-prompted with its own mask's tight box; at 72 px 0.308 without, 0.316 with two). Kept for the
# SAM trained on the classifier's own maps (2026-12-06, docs/classifier_maps_2026-12-06/): the map
# in a whole-image box did worse (0.328 against 0.354). No refine pass since: with every image on
# the maps for 10 epochs the first mask is the better one (valid, refine 0 against 1: 0.445 / 0.430
# and 0.501 / 0.482 for two seeds at 8e-4, 0.509 / 0.503 and 0.521 / 0.498 at 4e-4;
# docs/sam_map_training_2026-12-06/).
MAP_BOX_OF_INPUT = 0.5
REFINE_PASSES = 0
# SAM also segments the mirrored image and the two views' logits are averaged (segment
# --mirror-average): valid, the two map-trained SAMs at 4e-4, 0.509 / 0.521 -> 0.533 / 0.528, and
# 0.559 -> 0.570 for one trained 13 epochs (docs/map_flips_2026-12-06/). The map (method, layer,
# flips: segment --cam / --cam-layer / --map-flips) is the classifier config's eval.cam_method /
# cam_layer / map_flips, and the SAM trains on that map.
MIRROR_AVERAGE = True
# The classifier's probability as the mean over the input and its three flips (segment
# --probability-flips hv), at the fixed threshold 0.5: valid (2026-12-06 evening,
# docs/probability_flips_2026-12-06/), abnormal images missed 16 -> 13 of 119, false positives 13
# -> 13 of 104, study AUROC 0.967 -> 0.977, Dice with map-derived prompts 0.578 -> 0.595 ("h":
# 14 missed, 0.579).
PROBABILITY_FLIPS = "hv"
# Masks for every image of a study called abnormal (segment --gate study: MURA labels studies; a
# study's probability is its images' mean, as the report's study-level figures), at the same
# threshold: valid (2026-12-06, late; docs/study_gate_2026-12-06/), abnormal images left without a mask
# 13 -> 6 of 119, normal images given one 13 -> 3 of 104, Dice with map-derived prompts 0.595 ->
# 0.609.
GATE = "study"


class StageFailed(RuntimeError):
    """A stage's subprocess failed; the message names the stage, its command and its log."""


@dataclasses.dataclass
class Stage:
    name: str
    command: list[str]
    output: Path          # exists -> the stage is done
    done: bool
    missing: str = ""     # non-empty: the stage cannot run (why)


def _load_config(path: Path):
    spec = importlib.util.spec_from_file_location(f"_demo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            if part not in node:
                return False
        except TypeError:
            return False
        node = node[part]
    return True


def _done(*paths: Path) -> bool:
    return any(p.exists() for p in paths)


def plan(workdir: str | Path) -> list[Stage]:
    """The demo's stages for `workdir`, each with its command and whether its output exists."""
    w = Path(workdir).absolute()
    py = sys.executable
    data = w / "data"
    stages = []
    if CLASSIFIER_CONFIG.is_file():
        c = _load_config(CLASSIFIER_CONFIG)
        studies, seed = int(c.data.synthetic_studies), int(c.data.synthetic_seed)
        scale = float(c.data.synthetic_abnormality_scale)
        conspicuity = str(c.data.get("synthetic_conspicuity", "realistic"))
        parts = str(c.data.get("synthetic_parts", ""))
    else:
        studies, seed, scale, conspicuity, parts = 700, 0, 1.0, "realistic", ""
    stages.append(Stage("data", [py, "-m", "mskjax.data.synthetic", "--out", str(data), "--studies", str(studies),
                                 "--seed", str(seed), "--abnormality-scale", repr(scale),
                                 "--conspicuity", conspicuity, "--parts", parts], data / "synthetic.json", _done(data / "synthetic.json")))
    cls = w / "classifier"
    stages.append(Stage("classifier", [py, "-m", "mskjax.train", "--config", str(CLASSIFIER_CONFIG), "--workdir", str(cls),
                                       f"--config.data.root={data}"],
                        cls / "best", _done(cls / "results.json", cls / "best" / "mskjax.json"),
                        "" if CLASSIFIER_CONFIG.is_file() else f"{CLASSIFIER_CONFIG} does not exist"))
    seg = w / "segment"
    # The CAM the classifier's config reports localization with (eval.cam_method / eval.cam_layer)
    # is the one whose peak prompts SAM.
    cam_args = []
    if CLASSIFIER_CONFIG.is_file():
        cc = _load_config(CLASSIFIER_CONFIG)
        if _has_field(cc, "data.image_size"):
            cam_args += ["--box-side", f"{MAP_BOX_OF_INPUT * float(cc.data.image_size):g}"]
        if _has_field(cc, "eval.cam_method"):
            cam_args += ["--cam", str(cc.eval.cam_method)]
        if _has_field(cc, "eval.cam_layer") and cc.eval.cam_layer:
            cam_args += ["--cam-layer", str(cc.eval.cam_layer)]
        if _has_field(cc, "eval.map_flips") and cc.eval.map_flips != "none":
            cam_args += ["--map-flips", str(cc.eval.map_flips)]
    sam = w / "sam"
    cmd = [py, "-m", "mskjax.train", "--config", str(SAM_CONFIG), "--workdir", str(sam)]
    missing = ""
    map_args = ((["--mirror-average"] if MIRROR_AVERAGE else []) + ["--probability-flips", PROBABILITY_FLIPS]
                + ["--gate", GATE])
    if SAM_CONFIG.is_file():
        sc = _load_config(SAM_CONFIG)
        if _has_field(sc, "data.root"):
            cmd.append(f"--config.data.root={data}")
        # the same dataset as the classifier's, so the SAM run recognises it instead of refusing it
        for field, value in (("data.synthetic_studies", studies), ("data.synthetic_seed", seed),
                             ("data.synthetic_abnormality_scale", scale),
                             ("data.synthetic_conspicuity", conspicuity), ("data.synthetic_parts", parts)):
            if _has_field(sc, field):
                cmd.append(f"--config.{field}={value}")
        # the classifier's dataset is larger than the one the SAM config was timed on: fewer epochs
        # keep SAM's number of steps (and so its wall time) near the config's own
        if _has_field(sc, "train.epochs") and _has_field(sc, "data.synthetic_studies"):
            epochs = sam_epochs(int(sc.train.epochs), int(sc.data.synthetic_studies), studies)
            if epochs != int(sc.train.epochs):
                cmd.append(f"--config.train.epochs={epochs}")
        if _has_field(sc, "data.map_prompts"):
            # trained on this run's classifier's maps, with the map and box the segment stage uses
            cmd.append(f"--config.data.map_prompts={cls / 'best'}")
            for flag, field in (("--cam", "data.map_cam"), ("--cam-layer", "data.map_cam_layer"),
                                ("--box-side", "data.map_box_side"), ("--map-flips", "data.map_flips")):
                value = cam_args[cam_args.index(flag) + 1] if flag in cam_args else ""  # "": the last layer
                if value or flag == "--cam-layer":
                    cmd.append(f"--config.{field}={value}")
                elif flag == "--map-flips" and _has_field(sc, field):
                    cmd.append(f"--config.{field}=none")
    else:
        missing = (f"{SAM_CONFIG} does not exist yet: SAM fine-tuning (mskjax.train.sam with "
                   "configs/sam_synthetic.py) is not in this checkout, so the demo stops after the classifier")
    stages.append(Stage("sam", cmd, sam / "best", _done(sam / "results.json", sam / "best" / "mskjax.json"), missing))
    stages.append(Stage("segment", [py, "-m", "mskjax.segment", "--classifier", str(cls / "best"), "--sam",
                                    str(sam / "best"), "--dataset", f"synthetic:{data}:test", "--out", str(seg),
                                    *cam_args, "--refine", str(REFINE_PASSES), *map_args],
                        seg / "metrics.json", _done(seg / "metrics.json")))
    return stages


def sam_epochs(config_epochs: int, config_studies: int, demo_studies: int) -> int:
    """Epochs that give the SAM run on `demo_studies` studies about the step count its config gives
    on `config_studies` (at least 1)."""
    return max(1, round(config_epochs * config_studies / max(demo_studies, 1)))


def run_stage(stage: Stage, log_dir: Path) -> None:
    """Runs one stage with its output shown and logged; StageFailed names it on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage.name}.log"
    print(f"== stage {stage.name}: {' '.join(stage.command)}", flush=True)
    tail: list[str] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(stage.command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            if line[:1] in "IW" and line[1:5].isdigit():  # absl INFO/WARNING lines (I1126 ...): log only
                continue
            sys.stdout.write(line)
            tail = (tail + [line])[-20:]
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"stage {stage.name!r} failed with exit status {rc}\n  command: {' '.join(stage.command)}\n"
                          f"  log: {log}\n  last lines:\n" + "".join("    " + t for t in tail))


def summary(workdir: str | Path) -> str:
    """The demo's headline numbers from WORKDIR/segment/metrics.json."""
    m = json.loads((Path(workdir) / "segment" / "metrics.json").read_text())

    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    st = (m.get("classification") or {}).get("overall", {}).get("study", {})
    loc, seg = m["localization"], m["segmentation"]
    return "\n".join([
        f"test split: {m['counts']['processed']} images, {m['counts']['studies']} studies "
        f"({m['counts']['unreadable']} unreadable)",
        f"  study AUROC            {f(st.get('auroc', {}).get('value'))}",
        f"  study kappa            {f(st.get('kappa', {}).get('value'))}",
        f"  pointing game, 0 px    {f(loc['pointing_game']['accuracy'])}  (chance {f(loc['pointing_game'].get('chance'))}, "
        f"n={loc['pointing_game']['n']})",
        *([f"  pointing game, 15 px   {f(loc['pointing_game_15px']['accuracy'])}  "
           f"(chance {f(loc['pointing_game_15px'].get('chance'))})"] if "pointing_game_15px" in loc else []),
        f"  Dice, ground-truth box {f(seg['dice_gt_boxes']['mean'])}  (n={seg['dice_gt_boxes']['n']})",
        f"  Dice, CAM box          {f(seg['dice_cam_boxes']['mean'])}  (n={seg['dice_cam_boxes']['n']})",
        f"report: {Path(workdir) / 'segment' / 'index.html'}"])


def _classifier_summary(workdir: Path) -> str:
    path = workdir / "classifier" / "results.json"
    if not path.is_file():
        return f"classifier: {workdir / 'classifier' / 'best'}"
    test = json.loads(path.read_text()).get("test") or {}
    st = test.get("overall", {}).get("study", {})
    if not st:
        return f"classifier results: {path}"
    return (f"classifier on the test split: study AUROC {st['auroc']['value']:.4f}, kappa {st['kappa']['value']:.4f} "
            f"({path})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mskjax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo", help="where every stage writes (default runs/demo)")
    ap.add_argument("--dry-run", action="store_true", help="print the stages and what would run, run nothing")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir).absolute()
    stages = plan(workdir)
    if args.dry_run:
        for s in stages:
            state = "done (skipped)" if s.done else ("cannot run: " + s.missing if s.missing else "to run")
            print(f"{s.name:<11} {state}\n            {' '.join(s.command)}")
        return 0
    for s in stages:
        if s.done:
            print(f"== stage {s.name}: output exists ({s.output}), skipped", flush=True)
            continue
        if s.missing:
            print(f"== stage {s.name}: cannot run: {s.missing}", file=sys.stderr, flush=True)
            print(_classifier_summary(workdir))
            return 3
        try:
            run_stage(s, workdir / "logs")
        except StageFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print("\n" + summary(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
