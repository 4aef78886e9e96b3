"""Abnormalities of the synthetic radiographs: fractures, lytic lesions and metal hardware.

Each abnormality is drawn once per study in the *bone's own frame* (fraction t along segment
`seg` of bone `bone`, offsets in units of the local bone radius or in mm), so every view of the
study shows it wherever the pose and projection put that bone. Sizes are in mm; `unit` (mm that a
128-pixel image of the part's field of view gives one pixel) keeps them visible at 128 px.

Rendering: fractures and lytic lesions change the density of their bone (`apply_bone_effect`);
hardware adds metal primitives (`hardware_primitives`). Each returns a boolean mask in the same
window, which becomes the ground truth.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from mskjax.data.synthetic.anatomy import Anatomy, Target
from mskjax.data.synthetic.render import Bone, box_density, rod_density

TYPES = ("fracture", "hardware", "lesion")
HARDWARE_KINDS = ("plate", "kwire", "screws", "nail", "arthroplasty")
METAL_MU = 1.1  # 1/mm: a few mm of steel or titanium is almost opaque
ABNORMALITY_SCALE_RANGE = (0.25, 4.0)  # the `scale` of draw_abnormalities a dataset may use
# "realistic": the default mix (hairline, undisplaced and displaced fractures; lesions of any depth).
# "high": every fracture displaced (or, where the bone is not displaceable, a clean complete break)
# and every lesion a deep lucency that breaks through the cortex: the signs a from-scratch classifier on a
# few thousand images picks up (the default job's budget); hardware is the same in both.
CONSPICUITY = ("realistic", "high")


@dataclasses.dataclass(frozen=True)
class Fracture:
    """A break across bone `bone` at fraction t of segment `seg`.

    angle: tilt (deg) of the fracture line from transverse. gap: width (mm) of the lucent line;
    residual: fraction of bone density left inside it (0 = clean break, ~0.4 = hairline).
    window: (lo, hi) extent along the line in units of the local radius (incomplete cracks).
    disp_n, disp_t (mm), angulation (deg): displacement of the distal fragment (0 = undisplaced).
    jag_amp (mm), jag_period (mm), jag_phase: waviness of the line."""

    bone: str
    seg: int
    t: float
    angle: float
    gap: float
    residual: float = 0.0
    window: tuple[float, float] = (-9.0, 9.0)
    disp_n: float = 0.0
    disp_t: float = 0.0
    angulation: float = 0.0
    jag_amp: float = 0.0
    jag_period: float = 4.0
    jag_phase: float = 0.0
    kind: str = "complete"
    type: str = "fracture"

    @property
    def displaced(self) -> bool:
        return bool(self.disp_n or self.disp_t or self.angulation)


@dataclasses.dataclass(frozen=True)
class Lytic:
    """A lytic (lucent) lesion: ellipse centred at fraction t along the segment and offset d
    (in local radii) across it, semi-axes a (along) and b (across) in mm, tilted by `tilt` deg.
    depth: fraction of bone density removed at its centre; rim: sclerotic rim brightening."""

    bone: str
    seg: int
    t: float
    d: float
    a: float
    b: float
    depth: float
    rim: float = 0.0
    tilt: float = 0.0
    type: str = "lesion"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Metal in/on bone `bone`. kind in HARDWARE_KINDS; params holds the kind's geometry in the
    bone frame (fractions of the segment length, offsets in local radii, sizes in mm)."""

    bone: str
    seg: int
    kind: str
    params: tuple  # tuple of (key, value) pairs, kept hashable and deterministic
    type: str = "hardware"

    def p(self) -> dict:
        return dict(self.params)


def _unit(v):
    v = np.asarray(v, float)
    return v / np.hypot(*v)


def _rotv(v, deg):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def anchor(ab, anatomy: Anatomy) -> np.ndarray:
    """World point where an abnormality sits (used to check it is in the field of view)."""
    seg = anatomy.bones[ab.bone].segs[ab.seg]
    if isinstance(ab, Fracture):
        return seg.point(ab.t)
    if isinstance(ab, Lytic):
        _, _, _, length = seg.frame()
        return seg.point(ab.t, ab.d * seg.radius_at(ab.t * length))
    p = ab.p()
    return seg.point(p.get("t_mid", 0.5))


def pad_for(ab) -> float:
    """Extra world margin (mm) a bone's drawing window needs for this abnormality."""
    if isinstance(ab, Fracture) and ab.displaced:
        return abs(ab.disp_n) + abs(ab.disp_t) + 40.0 * math.sin(math.radians(abs(ab.angulation))) + 2.0
    return 0.0


def apply_bone_effect(ab, bone: Bone, x, y, dens, inside, px: float, density_fn):
    """Apply a Fracture or Lytic to a bone's density in a window.

    x, y: world coordinates (mm) of the window's pixels; dens, inside: the bone's density and
    outline there; px: mm per pixel; density_fn(x, y) -> (dens, inside) re-evaluates the intact
    bone (for displaced fragments). Returns (dens, mask) with mask the abnormality's pixels.
    """
    seg = bone.segs[ab.seg]
    p0, u, n, length = seg.frame()
    r_loc = seg.radius_at(ab.t * length)
    f32 = np.float32
    if isinstance(ab, Lytic):
        c = seg.point(ab.t, ab.d * r_loc)
        ua = _rotv(u, ab.tilt)
        na = np.array([-ua[1], ua[0]])
        dx, dy = x - f32(c[0]), y - f32(c[1])
        qa = (dx * f32(ua[0]) + dy * f32(ua[1])) * f32(1.0 / ab.a)
        qb = (dx * f32(na[0]) + dy * f32(na[1])) * f32(1.0 / ab.b)
        rr = np.sqrt(qa * qa + qb * qb)
        edge = min(ab.a, ab.b)
        w = np.clip(0.5 + (1.0 - rr) * f32(edge / px), 0.0, 1.0)
        factor = 1.0 - f32(ab.depth) * w
        if ab.rim:
            factor = factor * (1.0 + f32(ab.rim) * np.exp(-np.square((rr - 1.0) * f32(edge / max(px, 0.5)))))
        return dens * factor, inside & (rr < 1.0)

    # fracture
    c = seg.point(ab.t)
    m = _rotv(u, ab.angle)  # normal of the fracture line
    el = np.array([-m[1], m[0]])  # direction along the line
    half = 0.5 * ab.gap
    band = half + px

    def line_coords(xx, yy):
        dx, dy = xx - f32(c[0]), yy - f32(c[1])
        q = dx * f32(el[0]) + dy * f32(el[1])
        s = dx * f32(m[0]) + dy * f32(m[1])
        if ab.jag_amp:
            s = s + f32(ab.jag_amp) * np.sin(q * f32(2 * math.pi / ab.jag_period) + f32(ab.jag_phase))
        return s, q

    s, q = line_coords(x, y)
    lo, hi = ab.window[0] * r_loc, ab.window[1] * r_loc
    win = np.clip(0.5 + np.minimum(q - f32(lo), f32(hi) - q) / f32(px), 0.0, 1.0)
    if not ab.displaced:
        gapw = np.clip(0.5 + (f32(half) - np.abs(s)) / f32(px), 0.0, 1.0)
        dens = dens * (1.0 - f32(1.0 - ab.residual) * gapw * win)
        return dens, inside & (np.abs(s) < band) & (win > 0.5)
    # distal fragment: moved by delta and rotated about c; evaluate the intact bone at the
    # inverse-transformed points
    delta = ab.disp_n * n + ab.disp_t * u
    a = math.radians(-ab.angulation)
    ca, sa = math.cos(a), math.sin(a)
    vx, vy = x - f32(c[0] + delta[0]), y - f32(c[1] + delta[1])
    x2 = f32(c[0]) + f32(ca) * vx - f32(sa) * vy
    y2 = f32(c[1]) + f32(sa) * vx + f32(ca) * vy
    dens2, inside2 = density_fn(x2, y2)
    s2, _ = line_coords(x2, y2)
    wp = np.clip(0.5 + (-s - f32(half)) / f32(px), 0.0, 1.0)
    wd = np.clip(0.5 + (s2 - f32(half)) / f32(px), 0.0, 1.0)
    out = dens * wp + dens2 * wd
    mask = (inside & (np.abs(s) < band)) | (inside2 & (np.abs(s2) < band))
    return out, mask


def hardware_primitives(hw: Hardware, anatomy: Anatomy) -> list[tuple]:
    """World-frame metal primitives for a Hardware in the current pose:
    ("rod", p0, p1, r, thread) or ("box", p0, p1, half_width, depth)."""
    bone = anatomy.bones[hw.bone]
    seg = bone.segs[hw.seg]
    p0, u, n, length = seg.frame()
    p = hw.p()
    R = seg.radius_at(p.get("t_mid", 0.5) * length)
    out = []
    if hw.kind == "plate":
        t0, t1, side = p["t0"], p["t1"], p["side"]
        ts = p["screw_t"]
        sr = p["screw_r"]
        if side:  # plate seen edge-on along one cortex; screws cross the bone
            off = side * (R + 0.5 * p["thick"])
            out.append(("box", seg.point(t0, off), seg.point(t1, off), 0.5 * p["thick"], p["width"]))
            for t in ts:
                rl = seg.radius_at(t * length)
                out.append(("rod", seg.point(t, side * (rl + p["thick"])), seg.point(t, -side * (rl + 1.5)),
                            sr, 0.25))
                out.append(("rod", seg.point(t, side * (rl + p["thick"] + 0.6)),
                            seg.point(t, side * (rl + p["thick"] + 1.8)), sr * 1.9, 0.0))
        else:  # plate seen face-on over the bone; screws end-on as bright dots
            hwid = 0.5 * p["width"]
            out.append(("box", seg.point(t0), seg.point(t1), hwid, p["thick"]))
            for t in ts:
                out.append(("box", seg.point(t), seg.point(t), sr * 1.6, 2 * R))
            if p.get("tee"):
                tt = t1
                rl = seg.radius_at(tt * length)
                out.append(("box", seg.point(tt, -1.05 * rl), seg.point(tt, 1.05 * rl), hwid * 0.9, p["thick"]))
                for dd in np.linspace(-0.8, 0.8, 4):
                    out.append(("box", seg.point(tt, dd * rl), seg.point(tt, dd * rl), sr * 1.4, 2 * rl))
    elif hw.kind == "kwire":
        for t, ang, ext, bend in p["wires"]:
            c = seg.point(t)
            v = _rotv(u, ang)
            a, b = c - ext * v, c + ext * v
            out.append(("rod", a, b, p["r"], 0.0))
            if bend:  # bent end outside the bone
                out.append(("rod", a, a + bend * _rotv(v, 90.0), p["r"], 0.0))
    elif hw.kind == "screws":
        for t, ang, half, r in p["screws"]:
            c = seg.point(t)
            v = _rotv(n, ang)
            a, b = c - half * v, c + half * v
            out.append(("rod", a, b, r, 0.22))
            out.append(("rod", a - 1.2 * r * v, a + 0.4 * r * v, 1.9 * r, 0.0))
    elif hw.kind == "nail":
        a, b = seg.point(p["t0"]), seg.point(p["t1"])
        out.append(("rod", a, b, p["r"], 0.0))
        for t in p["lock_t"]:
            rl = seg.radius_at(t * length)
            out.append(("rod", seg.point(t, -rl - 2), seg.point(t, rl + 2), p["lock_r"], 0.2))
    elif hw.kind == "arthroplasty":
        head = bone.segs[1]  # the humeral head blob
        hc = 0.5 * (np.asarray(head.p0) + np.asarray(head.p1))
        out.append(("box", hc, hc, head.r * 0.92, p["head_depth"]))
        out.append(("rod", hc, seg.point(p["stem_t"]), p["stem_r"], 0.0))
        out.append(("rod", seg.point(0.3 * p["stem_t"]), seg.point(p["stem_t"]), p["stem_r"] * 0.8, 0.0))
    else:
        raise ValueError(f"unknown hardware kind {hw.kind!r}; expected one of {HARDWARE_KINDS}")
    return out


def primitive_bbox(prim) -> tuple[float, float, float, float]:
    _, a, b, r = prim[0], np.asarray(prim[1]), np.asarray(prim[2]), prim[3]
    m = r + 1.0
    return (min(a[0], b[0]) - m, min(a[1], b[1]) - m, max(a[0], b[0]) + m, max(a[1], b[1]) + m)


def primitive_density(prim, x, y, px: float):
    """(density, inside) of a metal primitive at world points (x, y)."""
    if prim[0] == "rod":
        _, a, b, r, thread = prim
        return rod_density(x, y, a, b, r, METAL_MU, px, thread=thread, pitch=max(1.2, 2.2 * r))
    _, a, b, hw, depth = prim
    return box_density(x, y, a, b, hw, depth, METAL_MU, px)


# ---------------------------------------------------------------------------------------------
# Drawing abnormalities for a study


def _pick_target(rng, targets, need) -> Target:
    cands = [t for t in targets if need(t)]
    if not cands:
        raise ValueError("no target bone fits this abnormality")
    w = np.array([t.weight for t in cands], float)
    return cands[int(rng.choice(len(cands), p=w / w.sum()))]


def _local_radius(anatomy: Anatomy, tg: Target, t: float) -> float:
    seg = anatomy.bones[tg.bone].segs[tg.seg]
    return seg.radius_at(t * seg.frame()[3])


def draw_fracture(rng, anatomy: Anatomy, unit: float, exclude=(), conspicuity: str = "realistic") -> Fracture:
    """One fracture; unit = mm per pixel of a 128-px image of this part. conspicuity "high" makes it
    displaced where the target allows, else a clean complete break (no hairlines), and displaces it
    at least 0.6 local radii with at least 8 degrees of angulation."""
    high = conspicuity == "high"
    tg = _pick_target(rng, anatomy.targets, lambda t: t.fracture and t.bone not in exclude)
    t = float(rng.uniform(tg.t_lo, tg.t_hi))
    r_loc = _local_radius(anatomy, tg, t)
    u = rng.random()
    if tg.displace and (u < 0.38 or high):
        kind = "displaced"
    elif u < 0.8 or high:
        kind = "complete"
    else:
        kind = "hairline"
    angle = float(rng.normal(0.0, 22.0))
    jag_amp = float(rng.uniform(0.15, 0.6)) * unit
    jag_period = float(rng.uniform(2.5, 6.0)) * unit
    kw = dict(bone=tg.bone, seg=tg.seg, t=t, angle=angle, jag_amp=jag_amp, jag_period=jag_period,
              jag_phase=float(rng.uniform(0, 2 * math.pi)), kind=kind)
    if kind == "hairline":
        gap = float(rng.uniform(1.7, 2.3)) * unit
        window = (-9.0, 9.0) if rng.random() < 0.5 else (
            (-1.3, float(rng.uniform(0.1, 0.6))) if rng.random() < 0.5 else (float(rng.uniform(-0.6, -0.1)), 1.3))
        return Fracture(gap=gap, residual=float(rng.uniform(0.1, 0.3)), window=window, **kw)
    gap = float(rng.uniform(2.2, 3.6)) * unit
    if kind == "complete":
        residual = float(rng.uniform(0.0, 0.12))
        return Fracture(gap=gap, residual=0.0 if high else residual, **kw)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    disp_n = float(rng.uniform(0.35, 1.0))
    disp_t = float(rng.uniform(-0.4, 0.3))
    angulation = float(rng.uniform(-14, 14))
    if high:  # same draws, pushed away from the barely-shifted end
        disp_n = 0.6 + 0.4 * (disp_n - 0.35) / 0.65
        angulation = math.copysign(8.0 + 12.0 * abs(angulation) / 14.0, angulation)
    return Fracture(gap=gap, disp_n=sign * disp_n * r_loc, disp_t=disp_t * r_loc, angulation=angulation, **kw)


def draw_lesion(rng, anatomy: Anatomy, unit: float, exclude=(), length_scale: float = 1.0,
                conspicuity: str = "realistic") -> Lytic:
    """One lytic lesion. conspicuity "high": 0.9 local radii wide, 0.3 radii off-centre so that it
    breaks through the cortex on one side, and 90-100% deep."""
    high = conspicuity == "high"
    tg = _pick_target(rng, anatomy.targets, lambda t: t.lesion and t.bone not in exclude)
    t = float(rng.uniform(tg.t_lo, tg.t_hi)) if tg.t_hi > tg.t_lo else tg.t_lo
    r_loc = _local_radius(anatomy, tg, t)
    b = max(float(rng.uniform(0.5, 0.8)) * r_loc, 3.0 * unit)
    b = min(b, 0.9 * r_loc) if r_loc > 2.7 * unit else 0.95 * r_loc
    if high:
        b = 0.9 * r_loc
    a = b * float(rng.uniform(1.1, 2.4)) * length_scale
    d = float(rng.uniform(-1.0, 1.0))
    d = (math.copysign(0.3, d) if high else d * max(0.0, (r_loc - b) / r_loc) * 0.8)
    depth = float(rng.uniform(0.6, 0.9))
    if high:
        depth = 0.9 + (depth - 0.6) / 3.0
    return Lytic(bone=tg.bone, seg=tg.seg, t=t, d=d, a=a, b=b, depth=depth,
                 rim=float(rng.uniform(0.1, 0.35)) if rng.random() < 0.4 else 0.0,
                 tilt=float(rng.normal(0, 8)))


def draw_hardware(rng, anatomy: Anatomy, unit: float) -> Hardware:
    tg = _pick_target(rng, anatomy.targets, lambda t: bool(t.hardware))
    kind = tg.hardware[int(rng.integers(len(tg.hardware)))]
    seg = anatomy.bones[tg.bone].segs[tg.seg]
    length = seg.frame()[3]
    r_shaft = seg.r
    if kind == "plate":
        mid = float(rng.uniform(tg.t_lo, tg.t_hi))
        half = min(float(rng.uniform(0.12, 0.22)), 0.45) * max(1.0, 60.0 / length) ** 0.5
        t0, t1 = max(0.04, mid - half), min(0.96, mid + half)
        n_screws = int(rng.integers(3, 7))
        side = int(rng.choice([-1, 0, 1]))
        tee = bool(side == 0 and t1 > 0.85 and rng.random() < 0.7)
        params = dict(t_mid=0.5 * (t0 + t1), t0=t0, t1=t1, side=side, tee=tee,
                      thick=max(1.6, 0.9 * unit) * (1.0 if r_shaft > 5 else 0.7),
                      width=min(2.2 * r_shaft, 12.0) * float(rng.uniform(0.75, 0.95)),
                      screw_r=max(0.7, min(1.8, 0.28 * r_shaft), 0.6 * unit),
                      screw_t=tuple(float(v) for v in np.linspace(t0 + 0.03, t1 - 0.03, n_screws)))
    elif kind == "kwire":
        n = int(rng.integers(1, 4))
        wires = []
        t_mid = float(rng.uniform(tg.t_lo, tg.t_hi))
        for _ in range(n):
            t = float(np.clip(t_mid + rng.normal(0, 0.08), 0.02, 0.98))
            wires.append((t, float(rng.uniform(15, 50) * rng.choice([-1, 1])),
                          float(rng.uniform(2.5, 5.0)) * r_shaft + 6.0,
                          float(rng.uniform(3, 8)) if rng.random() < 0.4 else 0.0))
        params = dict(t_mid=t_mid, r=max(0.7, 0.7 * unit), wires=tuple(wires))
    elif kind == "screws":
        n = int(rng.integers(1, 3))
        t_mid = float(rng.uniform(tg.t_lo, tg.t_hi)) if tg.t_hi > tg.t_lo else tg.t_lo
        screws = []
        for i in range(n):
            t = float(np.clip(t_mid + (i - 0.5 * (n - 1)) * 0.12, 0.02, 0.98))
            rl = seg.radius_at(t * length)
            screws.append((t, float(rng.uniform(-35, 35)), 1.05 * rl, max(0.8, min(1.8, 0.25 * rl), 0.7 * unit)))
        params = dict(t_mid=t_mid, screws=tuple(screws))
    elif kind == "nail":
        t0 = float(rng.uniform(0.02, 0.12))
        t1 = float(rng.uniform(0.8, 0.95))
        params = dict(t_mid=0.5 * (t0 + t1), t0=t0, t1=t1, r=max(0.9, 0.36 * r_shaft, 0.7 * unit),
                      lock_r=max(0.8, 0.18 * r_shaft, 0.6 * unit),
                      lock_t=(t0 + 0.05, t1 - 0.05) if rng.random() < 0.6 else ())
    elif kind == "arthroplasty":
        params = dict(t_mid=0.05, head_depth=float(rng.uniform(8, 14)), stem_t=float(rng.uniform(0.35, 0.55)),
                      stem_r=max(2.0, 0.42 * r_shaft))
    else:
        raise ValueError(f"unknown hardware kind {kind!r}")
    return Hardware(bone=tg.bone, seg=tg.seg, kind=kind, params=tuple(sorted(params.items())))


def draw_abnormalities(rng, kind: str, anatomy: Anatomy, unit: float, scale: float = 1.0,
                       conspicuity: str = "realistic") -> list:
    """The abnormalities of one abnormal study (1-2 of one type).

    scale enlarges them: fracture gaps, jags and hardware dimensions use `unit * scale`; a lesion's
    width is bounded by its bone, so its minimum width uses `unit * scale` and its length is
    multiplied by `scale`. At scale 1 the draws are exactly those of the default look.
    conspicuity: one of CONSPICUITY (see there); "realistic" draws are unchanged by the knob."""
    if conspicuity not in CONSPICUITY:
        raise ValueError(f"unknown conspicuity {conspicuity!r}; expected one of {CONSPICUITY}")
    unit = unit * scale  # exact at scale 1: the default draws are unchanged
    if kind == "fracture":
        first = draw_fracture(rng, anatomy, unit, conspicuity=conspicuity)
        out = [first]
        bones = {t.bone for t in anatomy.targets if t.fracture}
        p_second = 0.45 if {"radius", "ulna"} <= bones and first.bone in ("radius", "ulna") else 0.1
        if len(bones) > 1 and rng.random() < p_second:
            out.append(draw_fracture(rng, anatomy, unit, exclude=(first.bone,), conspicuity=conspicuity))
        return out
    if kind == "lesion":
        first = draw_lesion(rng, anatomy, unit, length_scale=scale, conspicuity=conspicuity)
        out = [first]
        bones = {t.bone for t in anatomy.targets if t.lesion}
        if len(bones) > 1 and rng.random() < 0.15:
            out.append(draw_lesion(rng, anatomy, unit, exclude=(first.bone,), length_scale=scale,
                                   conspicuity=conspicuity))
        return out
    if kind == "hardware":
        return [draw_hardware(rng, anatomy, unit)]
    raise ValueError(f"unknown abnormality type {kind!r}; expected one of {TYPES}")
