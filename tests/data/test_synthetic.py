"""The synthetic MURA-layout dataset: layout, CSV format, ground truth, determinism, difficulty."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mskjax.data import synthetic
from mskjax.data.synthetic import anatomy as anat
from mskjax.data.synthetic import lesions as les

N_STUDIES = 110
SEED = 3
SIZE = (96, 160)
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn") / "SYNTEST"
    summary = synthetic.generate(root, N_STUDIES, SEED, size_range=SIZE, workers=2)
    return root, summary


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _images(root: Path) -> list[str]:
    return [r[0] for sp in SPLITS for r in _rows(root / f"{sp}_image_paths.csv")]


def _studies(root: Path) -> dict[str, int]:
    return {r[0]: int(r[1]) for sp in SPLITS for r in _rows(root / f"{sp}_labeled_studies.csv")}


def auroc(scores, labels) -> float:
    """Rank-sum (Mann-Whitney) AUROC with average ranks for ties."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels, bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auroc_helper():
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_csv_layout(dataset):
    root, _ = dataset
    name = root.name
    img_re = re.compile(rf"^{name}/(train|valid|test)/XR_[A-Z]+/patient\d{{5}}/study\d+_(positive|negative)/image\d+\.png$")
    for sp in SPLITS:
        img_rows = _rows(root / f"{sp}_image_paths.csv")
        study_rows = _rows(root / f"{sp}_labeled_studies.csv")
        assert img_rows and study_rows
        # no header: the first row is data like every other
        assert img_rows[0][0].startswith(f"{name}/{sp}/") and study_rows[0][0].startswith(f"{name}/{sp}/")
        studies = {}
        for row in study_rows:
            assert len(row) == 2, row
            path, label = row
            assert path.endswith("/") and path.startswith(f"{name}/{sp}/XR_")
            assert label in ("0", "1")
            assert path.rstrip("/").endswith("_positive" if label == "1" else "_negative")
            assert (root / path.split("/", 1)[1]).is_dir()
            studies[path] = 0
        for (path,) in img_rows:
            assert img_re.match(path), path
            assert path.split("/")[1] == sp
            studies[path.rsplit("/", 1)[0] + "/"] += 1  # KeyError: image of an unlisted study
            f = root / path.split("/", 1)[1]
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "L"
                assert SIZE[0] <= max(im.size) <= SIZE[1]
        assert all(1 <= n <= 4 for n in studies.values()), studies
    on_disk = sorted(str(p.relative_to(root)) for p in root.glob("[!m]*/XR_*/*/*/*.png"))
    assert on_disk == sorted(p.split("/", 1)[1] for p in _images(root))


def test_summary_matches_files(dataset):
    root, summary = dataset
    assert json.loads((root / "synthetic.json").read_text()) == summary
    assert summary["config"]["seed"] == SEED and summary["version"] == synthetic.VERSION
    images, studies = _images(root), _studies(root)
    assert summary["totals"]["images"] == len(images)
    assert summary["totals"]["studies"] == len(studies) == N_STUDIES
    assert summary["totals"]["abnormal_studies"] == sum(studies.values())
    for sp in SPLITS:
        s = summary["splits"][sp]
        assert s["images"] == len(_rows(root / f"{sp}_image_paths.csv"))
        assert sum(p["studies"] for p in s["parts"].values()) == s["studies"]
        assert sum(s["types"].values()) == s["abnormal_studies"]


def test_balance_parts_and_types(dataset):
    root, summary = dataset
    studies = _studies(root)
    frac = sum(studies.values()) / len(studies)
    assert 0.4 <= frac <= 0.6
    parts = {p.split("/")[2] for p in studies}
    assert parts == set(anat.PARTS)
    boxes = json.loads((root / "boxes.json").read_text())
    types = {b["type"] for v in boxes.values() for b in v}
    assert types == set(les.TYPES)
    for part in anat.PARTS:  # every part has normal and abnormal studies
        labels = [lab for p, lab in studies.items() if p.split("/")[2] == part]
        assert 0 < sum(labels) < len(labels), part
    split_studies = {sp: summary["splits"][sp]["studies"] for sp in SPLITS}
    assert split_studies["train"] > split_studies["valid"] > 0 and split_studies["test"] > 0


def test_patients_disjoint(dataset):
    root, _ = dataset
    by_split = {sp: {r[0].split("/")[3] for r in _rows(root / f"{sp}_labeled_studies.csv")} for sp in SPLITS}
    assert not by_split["train"] & by_split["valid"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["valid"] & by_split["test"]


def test_masks_and_boxes(dataset):
    root, _ = dataset
    studies = _studies(root)
    boxes = json.loads((root / "boxes.json").read_text())
    images = _images(root)
    abnormal = {p for p in images if studies[p.rsplit("/", 1)[0] + "/"]}
    assert set(boxes) == abnormal
    mask_files = {str(p.relative_to(root / "masks")) for p in (root / "masks").rglob("*.png")}
    assert mask_files == {p.split("/", 1)[1] for p in abnormal}
    for p in abnormal:
        rel = p.split("/", 1)[1]
        with Image.open(root / rel) as im:
            size = im.size
        mask = np.asarray(Image.open(root / "masks" / rel))
        assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, p
        m = mask > 0
        entries = boxes[p]
        assert entries and all(set(e) == {"box", "type"} and e["type"] in les.TYPES for e in entries)
        assert len({e["type"] for e in entries}) == 1  # one abnormality type per study
        ys, xs = np.nonzero(m)
        bx = np.array([e["box"] for e in entries], float)
        union = [bx[:, 0].min(), bx[:, 1].min(), bx[:, 2].max(), bx[:, 3].max()]
        assert union == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], p
        for x0, y0, x1, y1 in bx:  # each box is tight: mask pixels touch all four of its edges
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
            inner = m[int(y0):int(y1), int(x0):int(x1)]
            assert inner[:, 0].any() and inner[:, -1].any() and inner[0].any() and inner[-1].any()


def test_brightness_does_not_separate_classes(dataset):
    root, _ = dataset
    studies = _studies(root)
    means, stds, labels = [], [], []
    for p in _images(root):
        a = np.asarray(Image.open(root / p.split("/", 1)[1]), np.float32)
        means.append(a.mean())
        stds.append(a.std())
        labels.append(studies[p.rsplit("/", 1)[0] + "/"])
    assert len(labels) >= 200
    assert 0.35 <= auroc(means, labels) <= 0.65
    assert 0.35 <= auroc(stds, labels) <= 0.65


@pytest.mark.parametrize("part,kind", [("XR_FOREARM", "fracture"), ("XR_WRIST", "fracture"),
                                       ("XR_HUMERUS", "lesion"), ("XR_HAND", "hardware"),
                                       ("XR_SHOULDER", "hardware"), ("XR_ELBOW", "lesion")])
def test_abnormality_is_drawn_inside_its_mask(part, kind):
    """Rendering the same view with and without the abnormality changes pixels only at the mask
    (plus blur), darker for fractures and lesions, brighter for metal."""
    subject = anat.Subject()
    pose = anat.draw_pose(part, np.random.default_rng(0), 0)
    anatomy = anat.build(part, subject, pose)
    base = anat.build(part, subject, dict(synthetic.dataset._CANONICAL_POSE))
    abns = les.draw_abnormalities(np.random.default_rng(7), kind, base, synthetic.unit_mm(base))
    with_ab, masks, _ = synthetic.render_view(np.random.default_rng(11), anatomy, abns, (200, 200))
    without, none, _ = synthetic.render_view(np.random.default_rng(11), anatomy, [], (200, 200))
    assert none == []
    m = np.zeros(with_ab.shape, bool)
    for mk in masks:
        m |= mk
    assert m.sum() >= 6
    diff = with_ab.astype(int) - without.astype(int)
    grown = m.copy()
    for _ in range(4):  # blur spreads the change a few pixels
        grown[1:] |= grown[:-1]; grown[:-1] |= grown[1:]; grown[:, 1:] |= grown[:, :-1]; grown[:, :-1] |= grown[:, 1:]
    changed = np.abs(diff) > 6
    assert changed.sum() > 0
    assert (changed & ~grown).sum() <= 0.03 * changed.sum()
    inside = diff[m].mean()
    assert (inside > 8) if kind == "hardware" else (inside < -4), inside


@pytest.mark.parametrize("kind", les.TYPES)
def test_abnormality_scale_enlarges_abnormalities_only(kind):
    """The same study at abnormality_scale 2 has larger abnormality masks; its normal twin (the same
    seed with no abnormality) is unchanged by the knob."""
    areas = {}
    for scale in (1.0, 2.0):
        areas[scale] = [int((m > 0).sum()) for i in range(6)
                        for m in synthetic.render_study(5, i, "XR_FOREARM", kind, (160, 160), scale)["masks"][:1]]
    assert np.mean(areas[2.0]) > 1.5 * np.mean(areas[1.0]), areas
    a = synthetic.render_study(5, 0, "XR_HAND", None, (96, 96), 1.0)["images"]
    b = synthetic.render_study(5, 0, "XR_HAND", None, (96, 96), 3.0)["images"]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_abnormality_scale_is_part_of_the_dataset_identity(tmp_path):
    root = tmp_path / "SYN"
    s1 = synthetic.generate(root, 4, 1, size_range=(64, 80), workers=1)
    assert "abnormality_scale" not in s1["config"]  # datasets made before the knob still match
    with pytest.raises(synthetic.SyntheticDatasetError, match="abnormality_scale"):
        synthetic.generate(root, 4, 1, size_range=(64, 80), abnormality_scale=2.0)
    s2 = synthetic.generate(root, 4, 1, size_range=(64, 80), abnormality_scale=2.0, overwrite=True, workers=1)
    assert s2["config"]["abnormality_scale"] == 2.0
    with pytest.raises(ValueError, match="abnormality_scale"):
        synthetic.generate(tmp_path / "z", 4, 1, abnormality_scale=0.0)


def _draws(kind: str, conspicuity: str, per_part: int = 12) -> list:
    """(abnormality, its local bone radius in mm) for `per_part` studies of every body part."""
    out = []
    for part in anat.PARTS:
        for i in range(per_part):
            rng = np.random.default_rng(i)
            base = anat.build(part, anat.draw_subject(rng), dict(synthetic.dataset._CANONICAL_POSE))
            for ab in les.draw_abnormalities(rng, kind, base, synthetic.unit_mm(base), 1.0, conspicuity):
                seg = base.bones[ab.bone].segs[ab.seg]
                out.append((ab, seg.radius_at(ab.t * seg.frame()[3]) if kind != "hardware" else None))
    return out


def test_high_conspicuity_fractures_are_displaced_or_clean_breaks():
    realistic = [ab for ab, _ in _draws("fracture", "realistic")]
    assert {ab.kind for ab in realistic} == {"displaced", "complete", "hairline"}  # the mix it replaces
    high = _draws("fracture", "high")
    assert {ab.kind for ab, _ in high} <= {"displaced", "complete"}
    assert any(ab.kind == "displaced" for ab, _ in high)
    for ab, r in high:
        if ab.kind == "displaced":
            assert abs(ab.disp_n) >= 0.6 * r - 1e-9 and 8.0 <= abs(ab.angulation) <= 20.0, ab
        else:
            assert ab.residual == 0.0 and ab.window == (-9.0, 9.0), ab


def test_high_conspicuity_lesions_are_deep_and_reach_the_cortex():
    realistic = [ab for ab, _ in _draws("lesion", "realistic")]
    assert min(ab.depth for ab in realistic) < 0.7
    for ab, r in _draws("lesion", "high"):
        assert 0.9 <= ab.depth <= 1.0 and ab.b == pytest.approx(0.9 * r), ab
        assert abs(ab.d) + ab.b / r > 1.0  # off-centre past the bone's edge: the cortex is eaten
    # hardware does not depend on the knob
    assert [repr(a) for a, _ in _draws("hardware", "high", 4)] == [repr(a) for a, _ in _draws("hardware", "realistic", 4)]
    with pytest.raises(ValueError, match="conspicuity"):
        les.draw_abnormalities(np.random.default_rng(0), "lesion", anat.build("XR_HAND", anat.draw_subject(
            np.random.default_rng(0)), dict(synthetic.dataset._CANONICAL_POSE)), 1.0, 1.0, "loud")


def test_conspicuity_is_part_of_the_dataset_identity(tmp_path):
    root = tmp_path / "SYN"
    s1 = synthetic.generate(root, 4, 1, size_range=(64, 80), workers=1)
    assert "conspicuity" not in s1["config"]  # datasets made before the knob still match
    with pytest.raises(synthetic.SyntheticDatasetError, match="conspicuity"):
        synthetic.generate(root, 4, 1, size_range=(64, 80), conspicuity="high")
    s2 = synthetic.generate(root, 4, 1, size_range=(64, 80), conspicuity="high", overwrite=True, workers=1)
    assert s2["config"]["conspicuity"] == "high"
    with pytest.raises(ValueError, match="conspicuity"):
        synthetic.generate(tmp_path / "z", 4, 1, conspicuity="loud")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_independent_of_workers(tmp_path):
    a = synthetic.generate(tmp_path / "a" / "SYN", 9, 21, size_range=(64, 96), workers=1)
    b = synthetic.generate(tmp_path / "b" / "SYN", 9, 21, size_range=(64, 96), workers=2)
    c = synthetic.generate(tmp_path / "c" / "SYN", 9, 22, size_range=(64, 96), workers=1)
    assert a == b
    ta, tb, tc = _tree(tmp_path / "a" / "SYN"), _tree(tmp_path / "b" / "SYN"), _tree(tmp_path / "c" / "SYN")
    assert ta == tb
    assert ta != tc
    common = [k for k in ta if k.endswith(".png") and k in tc]
    assert any(ta[k] != tc[k] for k in common) or set(ta) != set(tc)


def test_reuse_overwrite_and_refusal(tmp_path):
    root = tmp_path / "SYN"
    s1 = synthetic.generate(root, 4, 1, size_range=(64, 80))
    marker = root / "synthetic.json"
    before = marker.stat().st_mtime_ns
    some_png = next(root.glob("*/XR_*/*/*/image1.png"))
    some_png.write_bytes(b"changed")  # reuse must not touch existing files
    assert synthetic.generate(root, 4, 1, size_range=(64, 80)) == s1
    assert marker.stat().st_mtime_ns == before and some_png.read_bytes() == b"changed"
    with pytest.raises(synthetic.SyntheticDatasetError, match="overwrite"):
        synthetic.generate(root, 5, 1, size_range=(64, 80))
    s2 = synthetic.generate(root, 5, 1, size_range=(64, 80), overwrite=True)
    assert s2["totals"]["studies"] == 5
    assert not some_png.exists() or some_png.read_bytes() != b"changed"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(synthetic.SyntheticDatasetError, match="not empty"):
        synthetic.generate(foreign, 3, 0, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, capsys):
    out = tmp_path / "CLI"
    assert synthetic.main(["--out", str(out), "--studies", "3", "--seed", "4", "--size-range", "64", "72",
                           "--splits", "train:2,valid:1", "--workers", "1"]) == 0
    assert "3 studies" in capsys.readouterr().out
    summary = json.loads((out / "synthetic.json").read_text())
    assert summary["config"]["size_range"] == [64, 72]
    assert set(summary["splits"]) == {"train", "valid"}
    assert (out / "train_labeled_studies.csv").is_file() and not (out / "test_labeled_studies.csv").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_studies"):
        synthetic.generate(tmp_path / "x", 0, 0)
    with pytest.raises(ValueError, match="size_range"):
        synthetic.generate(tmp_path / "y", 3, 0, size_range=(200, 100))
    with pytest.raises(ValueError, match="splits"):
        synthetic.plan_studies(3, 0, splits=(("train", 1.0), ("train", 1.0)))
    with pytest.raises(ValueError, match="body part"):
        synthetic.render_study(0, 0, "XR_KNEE", None)
    with pytest.raises(ValueError, match="abnormality type"):
        synthetic.render_study(0, 0, "XR_HAND", "tumour")
    with pytest.raises(ValueError, match="empty mask"):
        synthetic.mask_box(np.zeros((4, 4), bool))


def test_parts_restrict_the_dataset_and_are_part_of_its_identity(tmp_path):
    plan = synthetic.plan_studies(40, 0, parts=("XR_HUMERUS", "XR_FOREARM"))
    assert {s["part"] for s in plan} == {"XR_FOREARM", "XR_HUMERUS"}
    assert abs(sum(s["part"] == "XR_FOREARM" for s in plan) - 20) <= 1  # balanced
    assert synthetic.plan_studies(30, 2) == synthetic.plan_studies(30, 2, parts=synthetic.PARTS)  # default unchanged
    root = tmp_path / "SYN"
    s = synthetic.generate(root, 6, 1, size_range=(64, 80), workers=1, parts=("XR_HUMERUS", "XR_FOREARM"))
    assert s["config"]["parts"] == ["XR_FOREARM", "XR_HUMERUS"]
    assert set(s["splits"]["train"]["parts"]) == {"XR_FOREARM", "XR_HUMERUS"}
    rows = [r[0] for sp in SPLITS for r in _rows(root / f"{sp}_image_paths.csv")]
    assert rows and all("/XR_FOREARM/" in r or "/XR_HUMERUS/" in r for r in rows)
    with pytest.raises(synthetic.SyntheticDatasetError, match="parts"):
        synthetic.generate(root, 6, 1, size_range=(64, 80), workers=1)
    for bad in ((), ("XR_KNEE",), ("XR_HAND", "XR_HAND")):
        with pytest.raises(ValueError, match="parts"):
            synthetic.generate(tmp_path / "z", 4, 1, parts=bad)


# ---------------------------------------------------------------------------------- evidence


def _union(masks, shape) -> np.ndarray:
    m = np.zeros(shape, bool)
    for mk in masks:
        m |= mk
    return m


@pytest.mark.parametrize("part,kind,conspicuity", [("XR_FOREARM", "fracture", "high"), ("XR_HUMERUS", "lesion", "high"),
                                                   ("XR_HAND", "hardware", "realistic"),
                                                   ("XR_WRIST", "fracture", "realistic")])
def test_counterfactual_is_the_render_without_abnormalities_and_takes_no_draws(part, kind, conspicuity):
    """render_view(counterfactual=True) returns the same image, masks and generator state as without
    it, and its fourth item is exactly the view rendered without the abnormalities from the same
    generator state; the evidence is exactly where the two differ."""
    base = anat.build(part, anat.Subject(), dict(synthetic.dataset._CANONICAL_POSE))
    abns = les.draw_abnormalities(np.random.default_rng(7), kind, base, synthetic.unit_mm(base), 3.0, conspicuity)
    anatomy = anat.build(part, anat.Subject(), anat.draw_pose(part, np.random.default_rng(2), 1))
    rngs = [np.random.default_rng(11) for _ in range(3)]
    img, masks, cv, cf = synthetic.render_view(rngs[0], anatomy, abns, (160, 200), True, counterfactual=True)
    img2, masks2, cv2 = synthetic.render_view(rngs[1], anatomy, abns, (160, 200), True)
    without, none, _ = synthetic.render_view(rngs[2], anatomy, [], (160, 200), True)
    assert np.array_equal(img, img2) and all(np.array_equal(a, b) for a, b in zip(masks, masks2))
    assert (cv.height, cv.width, cv.scale) == (cv2.height, cv2.width, cv2.scale)
    assert rngs[0].bit_generator.state == rngs[1].bit_generator.state == rngs[2].bit_generator.state
    assert np.array_equal(cf, without) and none == []
    ev = synthetic.evidence_mask(img, cf)
    assert np.array_equal(ev, img != without) and ev.any()
    m = _union(masks, img.shape)
    n, outside = synthetic.evidence_outside(ev, m)
    assert n == ev.sum()
    if kind == "fracture" and conspicuity == "high":  # the fragment moved: most evidence is off the mask
        assert outside > 0.5 * n, (outside, n)
    else:  # lesions, metal, gaps: the evidence hugs the mask (blur and a lesion's rim spill a little)
        assert outside <= 0.2 * n, (outside, n)


def test_dilate_disc():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    d = synthetic.dataset.dilate_disc(m, 3)
    yy, xx = np.mgrid[0:9, 0:9]
    assert np.array_equal(d, (yy - 4) ** 2 + (xx - 4) ** 2 <= 9)
    m[0, 8] = True  # at the border: no wrap-around
    d = synthetic.dataset.dilate_disc(m, 1)
    assert d[0, 7] and d[1, 8] and not d[0, 0] and not d[8, 8] and d.sum() == 5 + 3


def test_render_study_evidence_does_not_change_the_study():
    """The study's images, masks and boxes are byte-identical with and without evidence; normal
    studies have none."""
    for i, kind in enumerate(("fracture", "lesion", "hardware", None)):
        a = synthetic.render_study(4, i, "XR_FOREARM", kind, (96, 128), 3.0, "high")
        b = synthetic.render_study(4, i, "XR_FOREARM", kind, (96, 128), 3.0, "high", evidence=False)
        assert "evidence" not in b and len(a["evidence"]) == len(a["images"])
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a["images"], b["images"]))
        assert all((x is None and y is None) or x.tobytes() == y.tobytes() for x, y in zip(a["masks"], b["masks"]))
        assert a["boxes"] == b["boxes"] and a["abnormalities"] == b["abnormalities"]
        for img, mask, ev in zip(a["images"], a["masks"], a["evidence"]):
            if kind is None:
                assert mask is None and ev is None
            else:
                assert ev.shape == img.shape and ev.dtype == np.uint8 and set(np.unique(ev)) <= {0, 255}


def test_evidence_files_and_summary(dataset):
    root, summary = dataset
    masks = {str(p.relative_to(root / "masks")) for p in (root / "masks").rglob("*.png")}
    evidence = {str(p.relative_to(root / "evidence")) for p in (root / "evidence").rglob("*.png")}
    assert evidence == masks  # abnormal images only, every one
    boxes = json.loads((root / "boxes.json").read_text())
    fractions: dict = {}
    for p, entries in boxes.items():
        rel = p.split("/", 1)[1]
        ev = np.asarray(Image.open(root / "evidence" / rel))
        assert ev.shape == np.asarray(Image.open(root / rel)).shape and set(np.unique(ev)) <= {0, 255}
        n, k = synthetic.evidence_outside(ev > 0, np.asarray(Image.open(root / "masks" / rel)) > 0)
        fractions.setdefault(entries[0]["type"], []).append(k / n if n else None)
    stats = summary["evidence"]["outside_dilated_mask"]
    assert summary["evidence"]["dilation_px"] == 3
    for t, fr in fractions.items():
        s = stats["types"][t]
        have = [f for f in fr if f is not None]
        assert s["images"] == len(fr) and s["empty"] == len(fr) - len(have)
        assert s["mean"] == pytest.approx(np.mean(have), abs=1e-4)
    assert stats["types"]["lesion"]["mean"] < 0.1 and stats["types"]["hardware"]["mean"] < 0.05
    assert stats["subtypes"]["fracture/displaced"]["mean"] > 0.5 > stats["subtypes"]["fracture/hairline"]["mean"]
    assert sum(v["images"] for k, v in stats["subtypes"].items() if k.startswith("fracture/")) \
        == stats["types"]["fracture"]["images"]


def test_old_version_is_refused_and_regenerated_with_evidence(tmp_path):
    root = tmp_path / "SYN"
    synthetic.generate(root, 6, 2, size_range=(64, 80), workers=1, abnormal_fraction=1.0)
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["version"] == synthetic.VERSION != "1.0"
    shutil.rmtree(root / "evidence")  # what version 1.0 left behind
    meta["version"] = "1.0"
    del meta["evidence"]
    (root / "synthetic.json").write_text(json.dumps(meta))
    with pytest.raises(synthetic.SyntheticDatasetError, match="version 1.0"):
        synthetic.generate(root, 6, 2, size_range=(64, 80), workers=1, abnormal_fraction=1.0)
    s = synthetic.generate(root, 6, 2, size_range=(64, 80), workers=1, abnormal_fraction=1.0, overwrite=True)
    assert s["version"] == synthetic.VERSION and "evidence" in s
    assert {p.relative_to(root / "evidence") for p in (root / "evidence").rglob("*.png")} \
        == {p.relative_to(root / "masks") for p in (root / "masks").rglob("*.png")} != set()
    # a regeneration with other arguments clears the old evidence too
    synthetic.generate(root, 6, 3, size_range=(64, 80), workers=1, abnormal_fraction=1.0, overwrite=True)
    assert {p.relative_to(root / "evidence") for p in (root / "evidence").rglob("*.png")} \
        == {p.relative_to(root / "masks") for p in (root / "masks").rglob("*.png")}
