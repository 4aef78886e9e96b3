"""Shape families for the seven MURA body parts, in world millimetres (x right, y down).

`build(part, subject, pose)` returns an `Anatomy`: named bones, soft-tissue primitives, the field of
view (world bbox the image should frame) and the bones where abnormalities may be placed
(`Target`). `subject` (per study: size, bone width, density, cortex) fixes who is imaged; `pose`
(per view: flexion, finger spread, forearm rotation, lateral projection) changes how, so the views of
one study show the same anatomy in different configurations. Bone names and segment indices are
stable across poses, so an abnormality placed in a bone's own frame follows it from view to view.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from mskjax.data.synthetic.render import Bone, Seg, Soft

PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an abnormality may go: bone `bone`, segment `seg`, axial fraction in [t_lo, t_hi].

    fracture / displace / lesion: which abnormalities fit; hardware: which kinds of hardware
    (see lesions.HARDWARE_KINDS); weight: relative chance of being picked."""

    bone: str
    seg: int
    t_lo: float
    t_hi: float
    fracture: bool = True
    displace: bool = False
    lesion: bool = True
    hardware: tuple[str, ...] = ()
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Anatomy:
    bones: dict  # name -> Bone, in drawing order
    soft: tuple  # Soft primitives (max-merged)
    fov: tuple  # world bbox (x0, y0, x1, y1) the image should frame
    targets: tuple  # Target
    plates: tuple = ()  # flat bones: (convex polygon vertices (world mm), thickness mm)


@dataclasses.dataclass(frozen=True)
class Subject:
    """Per-study body: overall size, bone width, bone density, cortex thickness, soft tissue."""

    size: float = 1.0
    width: float = 1.0
    density: float = 1.0
    cortex: float = 1.0
    soft: float = 1.0


def draw_subject(rng: np.random.Generator) -> Subject:
    return Subject(size=float(rng.uniform(0.85, 1.12)), width=float(rng.uniform(0.88, 1.15)),
                   density=float(rng.uniform(0.8, 1.2)), cortex=float(rng.uniform(0.8, 1.2)),
                   soft=float(rng.uniform(0.85, 1.25)))


def _dir(angle_deg: float) -> np.ndarray:
    """Unit vector at angle (deg) from straight up, positive towards +x."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), -math.cos(a)])


def _rot(p, centre, angle_deg: float) -> tuple[float, float]:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    v = np.asarray(p, float) - np.asarray(centre, float)
    return (float(centre[0] + c * v[0] - s * v[1]), float(centre[1] + s * v[0] + c * v[1]))


def _blob(c, r, stretch=0.0, angle=0.0, **kw) -> Seg:
    """A rounded carpal-like bone: a short capsule of radius r, length `stretch` (mm)."""
    v = _dir(angle) * stretch / 2
    kw.setdefault("mu_t", 0.024 * min(1.0, 7.0 / r))
    kw.setdefault("cs", 0.16)
    kw.setdefault("ce", 0.16)
    return Seg((c[0] - v[0], c[1] - v[1]), (c[0] + v[0], c[1] + v[1]), r, f0=0.0, f1=0.0,
               k=max(stretch, 1.0), **kw)


def _chain(base, angle, lengths, radii, bends, gap=2.4, f0=0.45, f1=0.28):
    """Bones laid end to end from `base` along `angle` (deg), turning by bends[i] before bone i.

    Returns (segments, tip point)."""
    segs = []
    p = np.asarray(base, float)
    a = angle
    for i, (length, r) in enumerate(zip(lengths, radii)):
        a += bends[i]
        d = _dir(a)
        if i:
            p = p + gap * d
        q = p + length * d
        segs.append(Seg(tuple(p), tuple(q), r, f0=f0, f1=f1, k=0.22 * length, cs=0.34, ce=0.12))
        p = q
    return segs, p


def _polyline(pts, r, f_first=0.0, f_last=0.0, **kw):
    """Segments of a curved bone through `pts` (merged by max, so joints stay smooth)."""
    segs = []
    for j in range(len(pts) - 1):
        segs.append(Seg(tuple(pts[j]), tuple(pts[j + 1]), r, f0=f_first if j == 0 else 0.0,
                        f1=f_last if j == len(pts) - 2 else 0.0, k=10.0, **kw))
    return tuple(segs)


def _hand_parts(pose, origin=(0.0, 0.0), rows=True, fingers=True):
    """Carpals, metacarpals and phalanges of a right hand, fingers up, wrist centre near origin.

    pose: spread (finger fan factor), squeeze (1 = PA, <1 = oblique/lateral overlap), flex (deg per
    joint), dev (wrist deviation, deg). Returns (bones dict, soft list, fingertip points)."""
    ox, oy = origin
    sq = pose["squeeze"]
    dev = pose["dev"]
    pivot = (ox, oy + 58.0)

    def P(x, y):  # squeeze sideways about the midline, then deviate about the wrist
        return _rot((ox + (x - ox) * sq, y), pivot, dev)

    bones, soft, tips = {}, [], []
    if rows:
        carpals = {  # name: (x, y, r, stretch, angle)
            "scaphoid": (-16, 59, 5.6, 9, 40), "lunate": (-4, 62, 6.0, 3, 10),
            "triquetrum": (8.5, 59, 5.3, 4, -35), "pisiform": (12, 54, 3.9, 1, 20),
            "trapezium": (-21, 45, 5.4, 4, 45), "trapezoid": (-11, 44, 4.8, 3, 5),
            "capitate": (-1, 46, 6.0, 8, -3), "hamate": (10, 46, 5.8, 5, -12),
        }
        for name, (x, y, r, st, ang) in carpals.items():
            bones[name] = Bone(name, (_blob(P(ox + x, oy + y), r, st, ang + dev),))
    if fingers:
        bases = [(-11, 35, -5), (-3, 33, -1), (5, 34, 3.5), (12.5, 37, 8)]
        meta_len = [64, 62, 56, 52]
        meta_r = [4.4, 4.2, 3.9, 3.6]
        phal_len = [(40, 24, 17), (44, 28, 19), (41, 26, 18), (33, 19, 16)]
        phal_r = [(3.9, 3.2, 2.8), (4.0, 3.4, 2.9), (3.8, 3.2, 2.8), (3.4, 2.8, 2.5)]
        for i in range(4):
            bx, by, ang = bases[i]
            a = ang * pose["spread"] * (0.6 + 0.4 * sq) + dev
            segs, tip = _chain(P(ox + bx, oy + by), a, [meta_len[i]], [meta_r[i]], [0],
                               f0=0.35, f1=0.42)
            segs[0] = dataclasses.replace(segs[0], cap0=0.6)
            bones[f"metacarpal{i + 2}"] = Bone(f"metacarpal{i + 2}", tuple(segs))
            spread_extra = (i - 1.5) * 3.0 * (pose["spread"] - 0.8)
            ph, tip = _chain(tip, a + spread_extra, list(phal_len[i]), list(phal_r[i]),
                             [0, pose["flex"], pose["flex"]], gap=2.6)
            ph[-1] = dataclasses.replace(ph[-1], f1=0.45, k=4.0)  # distal tuft
            for name, s in zip(("proximal", "middle", "distal"), ph):
                bones[f"{name}{i + 2}"] = Bone(f"{name}{i + 2}", (s,))
            tips.append(tip)
            soft.append(Soft(tuple(segs[0].point(0.7)), tuple(tip), 9.0, r1=7.2))
        # thumb
        a = -34 * pose["spread"] ** 0.5 * (0.5 + 0.5 * sq) + dev
        segs, tip = _chain(P(ox - 25, oy + 40), a, [44, 31, 24], [4.4, 3.9, 3.3],
                           [0, -6 + pose["flex"] * 0.5, -4], gap=2.6, f0=0.35, f1=0.35)
        for name, s in zip(("metacarpal1", "proximal1", "distal1"), segs):
            bones[name] = Bone(name, (s,))
        tips.append(tip)
        soft.append(Soft(tuple(segs[0].point(0.2)), tuple(tip), 11.0, r1=8.0))
        soft.append(Soft(P(ox - 5, oy + 48), tuple(segs[0].point(0.95)), 20.0, r1=11.0))
    return bones, soft, tips


def _forearm_distal(pose, ox=0.0, y_end=72.0, length=120.0, lateral_shift=0.0):
    """Distal radius and ulna ending near y_end (going down to y_end + length)."""
    rx = -12 + lateral_shift
    ux = 14 - lateral_shift * 1.6
    radius = Seg((ox + rx - 2, y_end + length), (ox + rx, y_end), 8.0, f0=0.0, f1=0.9, k=16,
                 cs=0.3, ce=0.08, cap1=0.4)
    ulna = Seg((ox + ux, y_end + length), (ox + ux - 1, y_end + 8), 5.8, f0=0.0, f1=0.3, k=9,
               cs=0.3, ce=0.1, cap1=0.7)
    return {"radius": Bone("radius", (radius,)), "ulna": Bone("ulna", (ulna,))}


def _hand(pose):
    bones = _forearm_distal(pose, y_end=74.0, length=110.0, lateral_shift=pose["lat"] * 14)
    hb, soft, _ = _hand_parts(pose)
    bones.update(hb)
    soft = [Soft((0, 40), (0, 240), 31.0, r1=36.0), Soft((-3, -10), (-2, 55), 40.0 * (0.7 + 0.3 * pose["squeeze"]),
                                                 slab=34.0)] + soft
    fov = (-82.0, -138.0, 62.0, 112.0)
    hw = ("plate", "kwire", "screws")
    targets = tuple(
        [Target(f"metacarpal{i}", 0, 0.2, 0.85, displace=True, hardware=hw, weight=1.5) for i in (2, 3, 4, 5)]
        + [Target(f"proximal{i}", 0, 0.25, 0.75, displace=True, hardware=("kwire", "screws"))
           for i in (2, 3, 4, 5)]
        + [Target("metacarpal1", 0, 0.25, 0.75, hardware=("kwire",)),
           Target("radius", 0, 0.55, 0.9, displace=True, hardware=("plate", "kwire"), weight=1.5)])
    return bones, soft, fov, targets


def _finger(pose):
    flex = pose["flex"]
    sq = pose["squeeze"]
    meta = Seg((0, 150), (0, 56), 5.2, f0=0.0, f1=0.42, k=14, cs=0.34, ce=0.12)
    segs, tip = _chain((0, 56), 0.0, [44, 27, 19], [4.3, 3.6, 3.1], [0, flex, flex * 0.8],
                       gap=2.8, f0=0.45, f1=0.3)
    segs[-1] = dataclasses.replace(segs[-1], f1=0.5, k=4.0)
    bones = {"metacarpal": Bone("metacarpal", (meta,))}
    for name, s in zip(("proximal", "middle", "distal"), segs):
        bones[name] = Bone(name, (s,))
    soft = [Soft((0, 160), (0, 62), 24.0, r1=11.5), Soft((0, 70), tuple(tip), 10.5, r1=8.0)]
    if pose["neighbour"]:
        side = pose["neighbour"]
        nx = side * 24 * (0.5 + 0.5 * sq)
        nb_meta = Seg((nx, 150), (nx + side * 2, 60), 4.8, f0=0.0, f1=0.42, k=14)
        nsegs, ntip = _chain((nx + side * 2, 60), side * 6 * sq, [40, 24, 17], [4.0, 3.3, 2.9],
                             [0, flex, flex], gap=2.8)
        bones["neighbour_metacarpal"] = Bone("neighbour_metacarpal", (nb_meta,))
        bones["neighbour_proximal"] = Bone("neighbour_proximal", (nsegs[0],))
        bones["neighbour_middle"] = Bone("neighbour_middle", (nsegs[1],))
        bones["neighbour_distal"] = Bone("neighbour_distal", (nsegs[2],))
        soft.append(Soft((nx, 150), tuple(ntip), 11.0, r1=8.0))
    fov = (-36.0, -58.0, 36.0, 82.0)
    targets = (
        Target("proximal", 0, 0.2, 0.8, displace=True, hardware=("kwire", "screws"), weight=2.0),
        Target("middle", 0, 0.2, 0.8, displace=True, hardware=("kwire", "screws"), weight=1.5),
        Target("distal", 0, 0.3, 0.7, lesion=False, hardware=("kwire",), weight=0.7),
        Target("metacarpal", 0, 0.78, 0.92, hardware=("kwire", "plate")),
    )
    return bones, soft, fov, targets


def _forearm(pose):
    pro = pose["pronation"]  # 0: supine AP, 1: radius crossed over the ulna
    lat = pose["lat"]
    rx_d = -15 + 24 * pro + 10 * lat
    ux = 10 - 8 * lat
    radius = Seg((-11 + 4 * lat, -112), (rx_d, 118), 6.6, f0=0.45, f1=0.95, k=16, cs=0.34, bow=-3.0)
    ulna = Seg((ux, -126), (ux + 1, 112), 6.8, f0=0.85, f1=0.15, k=14, cs=0.34)
    humerus = Seg((0, -260), (0, -150), 10.0, f0=0.0, f1=1.25, k=18)
    condyle = _blob((0, -140), 9.0, stretch=36, angle=90)
    bones = {
        "humerus": Bone("humerus", (humerus, condyle)),
        "ulna": Bone("ulna", (ulna,)),
        "radius": Bone("radius", (radius,)),
    }
    for i, (x, r) in enumerate([(-14, 5.5), (-2, 5.8), (10, 5.2)]):
        bones[f"carpal{i}"] = Bone(f"carpal{i}", (_blob((x + rx_d + 13, 134), r, 3),))
    soft = [Soft((0, -230), (0, 165), 41.0, r1=29.0)]
    fov = (-58.0, -150.0, 58.0, 150.0)
    hw = ("plate", "nail")
    targets = (
        Target("radius", 0, 0.2, 0.82, displace=True, hardware=hw, weight=1.2),
        Target("ulna", 0, 0.2, 0.82, displace=True, hardware=hw, weight=1.0),
    )
    return bones, soft, fov, targets


def _elbow(pose):
    flex = pose["flex"]  # deg; ~0 for AP, ~90 for lateral
    lat = pose["lat"]
    pivot = (0.0, -4.0)
    humerus = Seg((0, -150), (0, -24), 10.0, f0=0.0, f1=1.15, k=20, cs=0.34)
    condyle = _blob((0, -10), 9.0, stretch=34 - 16 * lat, angle=90, cs=0.14, ce=0.14)
    epicondyle = _blob((-21 + 6 * lat, -22), 4.6)
    med_epi = _blob((23 - 8 * lat, -24), 5.0)

    def F(p):  # forearm bones rotate about the joint
        return _rot(p, pivot, -flex)

    rx = -13 + 9 * lat
    radius = Seg(F((rx, 3)), F((rx - 3, 150)), 5.8, f0=0.55, f1=0.0, k=9, cs=0.34)
    ulna = Seg(F((7, -2)), F((10, 150)), 6.8, f0=0.6, f1=0.0, k=14, cs=0.34)
    olecranon = _blob(F((6 - 4 * lat, -14 + 6 * lat)), 6.5, stretch=8, angle=-flex)
    bones = {
        "humerus": Bone("humerus", (humerus, condyle, epicondyle, med_epi)),
        "ulna": Bone("ulna", (ulna, olecranon)),
        "radius": Bone("radius", (radius,)),
    }
    fa_end = F((0, 170))
    soft = [Soft((0, -200), (0, -10), 40.0, r1=37.0), Soft(pivot, fa_end, 36.0, r1=31.0)]
    # frame the joint: the humerus above and the forearm wherever flexion puts it
    pts = np.array([(-60, -115), (60, -115), (-55, 25), (55, 25), F((-45, 110)), F((45, 110))])
    fov = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
    targets = (
        Target("humerus", 0, 0.55, 0.9, displace=True, hardware=("plate", "screws"), weight=1.2),
        Target("radius", 0, 0.02, 0.25, displace=False, hardware=("screws",), weight=1.0),
        Target("ulna", 0, 0.02, 0.35, displace=True, hardware=("kwire", "plate"), weight=1.0),
    )
    return bones, soft, fov, targets


def _wrist(pose):
    lat = pose["lat"]
    bones = _forearm_distal(pose, y_end=12.0, length=150.0, lateral_shift=lat * 14)
    hb, _, _ = _hand_parts(pose, origin=(0.0, -62.0), rows=True, fingers=True)
    for name, b in hb.items():
        if name.startswith(("proximal", "middle", "distal")):
            continue  # fingers are beyond the wrist film's field
        bones[name] = b
    soft = [Soft((0, -100), (0, 200), 31.0, r1=36.0), Soft((-3, -90), (-2, -10), 38.0 * (0.7 + 0.3 * pose["squeeze"]),
                                                  slab=32.0)]
    fov = (-62.0, -78.0, 62.0, 100.0)
    targets = (
        Target("radius", 0, 0.72, 0.95, displace=True, hardware=("plate", "kwire"), weight=2.5),
        Target("ulna", 0, 0.75, 0.97, displace=False, hardware=("kwire",), weight=0.8),
        Target("scaphoid", 0, 0.2, 0.8, lesion=False, hardware=("screws",), weight=1.0),
        Target("metacarpal2", 0, 0.1, 0.35, lesion=False, hardware=("kwire",), weight=0.5),
    )
    return bones, soft, fov, targets


def _humerus(pose):
    abd = pose["abd"]
    rotn = pose["rotation"]  # -1 internal .. 1 external: moves head/tuberosity
    top = (0.0, -128.0)

    def A(p):
        return _rot(p, top, abd)

    shaft = Seg(A((0, -118)), A((1, 128)), 11.0, f0=0.45, f1=0.95, k=26, cs=0.34, bow=2.0)
    head = _blob(A((-7 + 5 * rotn, -128)), 23.0, cs=0.09, ce=0.09)
    tuber = _blob(A((13 + 4 * rotn, -122)), 11.5, stretch=8, cs=0.1, ce=0.1)
    condyle = _blob(A((1, 134)), 9.0, stretch=42 - 18 * pose["lat"], angle=90, cs=0.14, ce=0.14)
    bones = {
        "glenoid": Bone("glenoid", (_blob((-38, -128), 6.0, stretch=30, cs=0.25, ce=0.25),
                                    Seg((-44, -112), (-88, -10), 5.5, f0=0, f1=0, k=10, mu_c=0.12))),
        "acromion": Bone("acromion", (Seg((-50, -168), (8, -165), 7.0, f0=0.2, f1=0.3, k=8),)),
        "humerus": Bone("humerus", (shaft, head, tuber, condyle)),
        "radius": Bone("radius", (Seg(A((-14, 154)), A((-17, 290)), 6.0, f0=0.55, f1=0, k=9),)),
        "ulna": Bone("ulna", (Seg(A((9, 146)), A((11, 290)), 7.0, f0=0.65, f1=0, k=13),)),
    }
    soft = [Soft(A((0, -150)), A((0, 200)), 44.0, r1=37.0), Soft((-140, -260), (-140, -40), 100.0, slab=60.0)]
    fov = (-90.0, -172.0, 80.0, 168.0)
    targets = (Target("humerus", 0, 0.15, 0.85, displace=True, hardware=("plate", "nail"), weight=3.0),)
    return bones, soft, fov, targets


def _shoulder(pose):
    abd = pose["abd"]
    rotn = pose["rotation"]
    centre = (24.0, 8.0)

    def A(p):
        return _rot(p, centre, abd)

    shaft = Seg(A((32, 14)), A((36, 200)), 12.0, f0=0.75, f1=0.0, k=26, cs=0.34, cap0=0.6)
    head = _blob(A((9 + 4 * rotn, 6)), 25.0, stretch=8, angle=-50, cs=0.1, ce=0.1)
    tuber = _blob(A((46 - 8 * (rotn + 1), -4)), 11.0, stretch=12, cs=0.09, ce=0.09)
    scap_mu = dict(mu_c=0.08, mu_m=0.02, mu_t=0.035)
    bones = {
        "scapula": Bone("scapula", (
            Seg((-10, 26), (-72, 160), 5.0, f0=0, f1=0, k=10, **scap_mu),
            Seg((-6, -30), (-125, -8), 5.5, f0=0, f1=0, k=10, **scap_mu),
            Seg((-20, -12), (2, -4), 5.0, f0=0, f1=0.3, k=5, **scap_mu),
        )),
        "glenoid": Bone("glenoid", (_blob((-9, 7), 5.0, stretch=30, cs=0.3, ce=0.3),)),
        "acromion": Bone("acromion", (Seg((-8, -34), (34, -36), 8.0, f0=0, f1=0.25, k=8, cap1=0.6),)),
        "clavicle": Bone("clavicle", _polyline(
            [(28, -44), (-12, -52), (-62, -50), (-110, -48), (-152, -62)],
            7.0, f_first=0.3, f_last=0.3)),
        "humerus": Bone("humerus", (shaft, head, tuber)),
    }
    for i in range(5):  # posterior ribs sweeping across the thorax
        y = -20 + 38 * i
        xs = np.linspace(-160, -40, 7)
        pts = [(float(x), float(y + 0.0028 * (x + 95) ** 2 - 6)) for x in xs]
        bones[f"rib{i}"] = Bone(f"rib{i}", _polyline(pts, 3.6 + 0.3 * i, cs=0.3, ce=0.3, mu_c=0.06,
                                                     mu_m=0.015, mu_t=0.015))
    soft = [Soft(A((34, 0)), A((40, 260)), 46.0), Soft((8, -6), (8, -6), 58.0),
            Soft((-170, 60), (-170, 200), 150.0, slab=45.0)]
    plates = (((-14, 20), (-18, -22), (-118, -14), (-80, 165)), 5.0),
    fov = (-140.0, -92.0, 110.0, 150.0)
    targets = (
        Target("humerus", 0, 0.02, 0.3, displace=True, hardware=("plate", "arthroplasty"), weight=2.0),
        Target("humerus", 1, 0.0, 0.0, fracture=False, lesion=True, hardware=(), weight=0.8),
        Target("clavicle", 1, 0.15, 0.85, displace=False, hardware=("plate",), weight=1.5),
    )
    return bones, soft, fov, targets, plates


_BUILDERS = {
    "XR_ELBOW": _elbow, "XR_FINGER": _finger, "XR_FOREARM": _forearm, "XR_HAND": _hand,
    "XR_HUMERUS": _humerus, "XR_SHOULDER": _shoulder, "XR_WRIST": _wrist,
}


def draw_pose(part: str, rng: np.random.Generator, view: int) -> dict:
    """Per-view pose. View 0 is the standard projection; later views are lateral/oblique more often."""
    lateral = bool(view > 0 and rng.random() < 0.6)
    squeeze = float(rng.uniform(0.35, 0.6)) if lateral else float(rng.uniform(0.85, 1.05))
    pose = {
        "lat": float(rng.uniform(0.6, 1.0)) if lateral else float(rng.uniform(0.0, 0.15)),
        "squeeze": squeeze,
        "spread": float(rng.uniform(0.6, 1.5)),
        "flex": float(rng.uniform(18, 35)) if lateral else float(rng.uniform(0, 8)),
        "dev": float(rng.uniform(-10, 10)),
        "pronation": float(rng.uniform(0.0, 1.0)) if rng.random() < 0.5 else float(rng.uniform(0, 0.2)),
        "abd": float(rng.uniform(-12, 12)),
        "rotation": float(rng.uniform(-1, 1)),
        "neighbour": int(rng.choice([-1, 0, 1], p=[0.35, 0.3, 0.35])),
    }
    if part == "XR_ELBOW":
        pose["flex"] = float(rng.uniform(70, 105)) if lateral else float(rng.uniform(-5, 15))
    return pose


def _scale_seg(s: Seg, sub: Subject) -> Seg:
    z = sub.size
    return dataclasses.replace(
        s, p0=(s.p0[0] * z, s.p0[1] * z), p1=(s.p1[0] * z, s.p1[1] * z), r=s.r * z * sub.width,
        k=s.k * z, bow=s.bow * z, cs=min(s.cs * sub.cortex, 0.6), ce=min(s.ce * sub.cortex, 0.6),
        mu_c=s.mu_c * sub.density, mu_m=s.mu_m * sub.density, mu_t=s.mu_t * sub.density)


def build(part: str, subject: Subject, pose: dict) -> Anatomy:
    """The anatomy of `part` for a subject in a pose (world mm, canonical orientation)."""
    if part not in _BUILDERS:
        raise ValueError(f"unknown body part {part!r}; expected one of {PARTS}")
    bones, soft, fov, targets, *plates = _BUILDERS[part](pose)
    plates = plates[0] if plates else ()
    z = subject.size
    plates = tuple((tuple((x * z, y * z) for x, y in verts), th * z * subject.density) for verts, th in plates)
    bones = {n: Bone(n, tuple(_scale_seg(s, subject) for s in b.segs)) for n, b in bones.items()}
    soft = tuple(dataclasses.replace(s, p0=(s.p0[0] * z, s.p0[1] * z), p1=(s.p1[0] * z, s.p1[1] * z),
                                     r=s.r * z * subject.soft ** 0.5, slab=s.slab * subject.soft)
                 for s in soft)
    fov = tuple(v * z for v in fov)
    return Anatomy(bones=bones, soft=soft, fov=fov, targets=targets, plates=plates)
