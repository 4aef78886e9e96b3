"""Drawing primitives for the synthetic radiograph generator (numpy only).

Everything is drawn as *projected attenuation*: for each pixel, the path length (mm) of the X-ray
through a primitive times its attenuation coefficient (1/mm). A bone is a hollow tube: its
projection is the chord through the outer cylinder minus the chord through the medullary cavity, so
bright cortical edges and a darker medulla come out of the geometry rather than being painted on.
The film turns total attenuation A into brightness 1 - exp(-A) (bone bright, air dark).

Frames: *world* coordinates are millimetres in the anatomy's canonical pose (x right, y down).
*Pixel* coordinates follow the project convention (x = column, y = row, pixel i covers [i, i+1),
centres at i + 0.5). `Canvas` holds the similarity transform between them and the world
coordinates of every pixel centre, so primitives are evaluated directly in millimetres.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Seg:
    """One straight piece of bone: a tube from p0 to p1 (world mm) with flared, rounded ends.

    r: shaft outer radius (mm). f0, f1: extra radius at the p0 / p1 end as a fraction of r
    (epiphyseal flare). k: flare length (mm). cs, ce: cortex thickness as a fraction of r in the
    shaft and at the ends. mu_c, mu_m, mu_t: attenuation (1/mm) of cortex, marrow (shaft cavity)
    and cancellous bone (ends). bow: sideways bend of the shaft's middle (mm, along the normal).
    cap0, cap1: length of the rounded end beyond p0 / p1 as a fraction of the end radius (1 =
    hemisphere, < 1 = flatter articular surface). plate: when > 0, a flat bone (scapula) of that
    thickness (mm) instead of a tube.
    """

    p0: tuple[float, float]
    p1: tuple[float, float]
    r: float
    f0: float = 0.3
    f1: float = 0.3
    k: float = 8.0
    cs: float = 0.32
    ce: float = 0.10
    mu_c: float = 0.11
    mu_m: float = 0.008
    mu_t: float = 0.024
    bow: float = 0.0
    cap0: float = 1.0
    cap1: float = 1.0
    plate: float = 0.0

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(p0, u, n, L): origin, unit axis, unit normal (u rotated +90 deg), length (mm)."""
        p0 = np.asarray(self.p0, np.float64)
        v = np.asarray(self.p1, np.float64) - p0
        length = float(np.hypot(*v))
        if length < 1e-6:
            u = np.array([0.0, 1.0])
        else:
            u = v / length
        return p0, u, np.array([-u[1], u[0]]), max(length, 1e-6)

    def radius_at(self, t: float) -> float:
        """Outer radius (mm) at distance t (mm) from p0 along the axis."""
        _, _, _, length = self.frame()
        tc = min(max(t, 0.0), length)
        g0 = math.exp(-((tc / self.k) ** 2))
        g1 = math.exp(-(((length - tc) / self.k) ** 2))
        return self.r * (1.0 + self.f0 * g0 + self.f1 * g1)

    def max_radius(self) -> float:
        return self.r * (1.0 + max(self.f0, 0.0) + max(self.f1, 0.0))

    def point(self, t_frac: float, d: float = 0.0) -> np.ndarray:
        """World point at fraction t_frac of the length and offset d (mm) along the normal."""
        p0, u, n, length = self.frame()
        return p0 + t_frac * length * u + d * n


def seg_density(x: Array, y: Array, s: Seg, texture: Array | None = None) -> tuple[Array, Array]:
    """Projected attenuation of one tube at world points (x, y) (float32 arrays, same shape).

    Returns (density, inside): density is dimensionless (mm * 1/mm); inside is the outline mask.
    texture (same shape, ~zero mean) modulates the cancellous density (trabecular pattern).
    """
    p0, u, n, length = s.frame()
    dx = x - np.float32(p0[0])
    dy = y - np.float32(p0[1])
    t = dx * np.float32(u[0]) + dy * np.float32(u[1])
    d = dx * np.float32(n[0]) + dy * np.float32(n[1])
    tc = np.clip(t, 0.0, length)
    if s.bow:
        tt = tc / np.float32(length)
        d = d - np.float32(4.0 * s.bow) * tt * (1.0 - tt)
    e = t - tc
    if s.cap0 != 1.0 or s.cap1 != 1.0:
        e = e * np.where(t < 0, np.float32(1.0 / s.cap0), np.float32(1.0 / s.cap1))
    rho2 = d * d + e * e
    g0 = np.exp(-np.square(tc * np.float32(1.0 / s.k)))
    g1 = np.exp(-np.square((np.float32(length) - tc) * np.float32(1.0 / s.k)))
    radius = np.float32(s.r) * (1.0 + np.float32(s.f0) * g0 + np.float32(s.f1) * g1)
    wend = np.maximum(g0, g1)
    cortex = np.float32(s.r) * (np.float32(s.cs) + np.float32(s.ce - s.cs) * wend)
    if s.plate:
        depth = radius - np.sqrt(rho2)  # distance inside the outline (mm)
        cover = np.clip(depth * np.float32(1.25), 0.0, 1.0)
        rim = np.clip(1.0 - depth / np.maximum(cortex, 1e-3), 0.0, 1.0) * cover
        mu = np.float32(s.mu_t) if texture is None else np.float32(s.mu_t) * (1.0 + texture)
        dens = np.float32(s.plate) * (mu * cover + np.float32(s.mu_c) * rim)
        return dens.astype(np.float32, copy=False), depth > 0
    r_in = np.maximum(radius - cortex, 0.0)
    outer = 2.0 * np.sqrt(np.maximum(radius * radius - rho2, 0.0))
    inner = 2.0 * np.sqrt(np.maximum(r_in * r_in - rho2, 0.0))
    # wide (flared) ends would project very bright if their cancellous density stayed that of a
    # narrow end; real epiphyses look about as bright as the shaft, so thin it with the width
    mu_in = np.float32(s.mu_m) + np.float32(s.mu_t - s.mu_m) * wend * (np.float32(s.r) / radius)
    if texture is not None:
        mu_in = mu_in * (1.0 + texture)
    dens = np.float32(s.mu_c) * (outer - inner) + mu_in * inner
    return dens.astype(np.float32, copy=False), rho2 < radius * radius


@dataclasses.dataclass(frozen=True)
class Bone:
    """A bone: one or more segments merged by taking the maximum (so joints of a polyline or a
    head on a shaft do not double up). segs[0] defines the bone's local frame."""

    name: str
    segs: tuple[Seg, ...]

    def world_bbox(self, pad: float = 0.0) -> tuple[float, float, float, float]:
        xs, ys = [], []
        for s in self.segs:
            m = s.max_radius() + pad
            for p in (s.p0, s.p1):
                xs += [p[0] - m, p[0] + m]
                ys += [p[1] - m, p[1] + m]
        return min(xs), min(ys), max(xs), max(ys)


def bone_density(x: Array, y: Array, bone: Bone, texture: Array | None = None) -> tuple[Array, Array]:
    """Max-merged density and union outline of a bone's segments at world points (x, y)."""
    dens, inside = seg_density(x, y, bone.segs[0], texture)
    for s in bone.segs[1:]:
        d2, i2 = seg_density(x, y, s, texture)
        dens = np.maximum(dens, d2)
        inside = inside | i2
    return dens, inside


@dataclasses.dataclass(frozen=True)
class Soft:
    """Soft tissue: a capsule (p0 -> p1, radius r mm) projected as a cylinder, or, when `slab`
    is set, an ellipse-outlined flat slab of that thickness (palm, torso); `scale` stretches the
    outline across the axis (ellipse semi-axes L/2 + r along, r*scale across). r1: radius at p1
    for a tapered capsule (default r)."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    r: float
    slab: float = 0.0
    scale: float = 1.0
    r1: float | None = None

    def world_bbox(self) -> tuple[float, float, float, float]:
        m = max(self.r, self.r1 or 0.0) * max(self.scale, 1.0)
        xs = [self.p0[0] - m, self.p0[0] + m, self.p1[0] - m, self.p1[0] + m]
        ys = [self.p0[1] - m, self.p0[1] + m, self.p1[1] - m, self.p1[1] + m]
        return min(xs), min(ys), max(xs), max(ys)


def soft_thickness(x: Array, y: Array, s: Soft) -> Array:
    """Path length (mm) through a soft-tissue primitive at world points (x, y)."""
    seg = Seg(s.p0, s.p1, s.r)
    p0, u, n, length = seg.frame()
    dx = x - np.float32(p0[0])
    dy = y - np.float32(p0[1])
    t = dx * np.float32(u[0]) + dy * np.float32(u[1])
    d = (dx * np.float32(n[0]) + dy * np.float32(n[1])) * np.float32(1.0 / s.scale)
    if s.slab:
        # ellipse with semi-axes (L/2 + r) along and r across; thickness falls off near the rim
        a = length / 2.0 + s.r
        q = np.square((t - np.float32(length / 2.0)) / np.float32(a)) + np.square(d / np.float32(s.r))
        return np.float32(s.slab) * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)) ** 0.5
    tc = np.clip(t, 0.0, length)
    e = t - tc
    rho2 = d * d + e * e
    rad = np.float32(s.r)
    if s.r1 is not None and s.r1 != s.r:
        rad = rad + np.float32((s.r1 - s.r) / length) * tc
    return 2.0 * np.sqrt(np.maximum(rad * rad - rho2, 0.0))


def rod_density(x: Array, y: Array, p0, p1, r: float, mu: float, px: float,
                thread: float = 0.0, pitch: float = 1.5) -> tuple[Array, Array]:
    """A metal cylinder (screw shaft, wire, nail) from p0 to p1 with radius r (mm).

    thread: relative radius modulation (screw threads) with period `pitch` mm. px: mm per pixel,
    used to keep at least a one-pixel-wide trace so thin wires survive rasterisation.
    Returns (density, inside).
    """
    seg = Seg(tuple(p0), tuple(p1), r)
    q0, u, n, length = seg.frame()
    dx = x - np.float32(q0[0])
    dy = y - np.float32(q0[1])
    t = dx * np.float32(u[0]) + dy * np.float32(u[1])
    d = dx * np.float32(n[0]) + dy * np.float32(n[1])
    tc = np.clip(t, 0.0, length)
    e = t - tc
    rad = np.float32(max(r, 0.5 * px))
    if thread:
        rad = rad * (1.0 + np.float32(thread) * np.sin(tc * np.float32(2 * math.pi / pitch)))
    rho2 = d * d + e * e
    chord = 2.0 * np.sqrt(np.maximum(rad * rad - rho2, 0.0))
    return (np.float32(mu) * chord).astype(np.float32, copy=False), rho2 < rad * rad


def box_density(x: Array, y: Array, p0, p1, half_width: float, depth: float, mu: float,
                px: float) -> tuple[Array, Array]:
    """A flat metal bar (plate) from p0 to p1, half_width mm across, `depth` mm thick along the
    beam; edges softened over one pixel. Returns (density, inside)."""
    seg = Seg(tuple(p0), tuple(p1), half_width)
    q0, u, n, length = seg.frame()
    dx = x - np.float32(q0[0])
    dy = y - np.float32(q0[1])
    t = dx * np.float32(u[0]) + dy * np.float32(u[1])
    d = np.abs(dx * np.float32(n[0]) + dy * np.float32(n[1]))
    e = np.abs(t - np.clip(t, 0.0, length))
    rho = np.sqrt(d * d + e * e)  # rounded ends
    cover = np.clip(0.5 + (np.float32(half_width) - rho) / np.float32(px), 0.0, 1.0)
    return (np.float32(mu * depth) * cover).astype(np.float32, copy=False), cover >= 0.5


class Canvas:
    """An image of H x W pixels and the similarity transform from world (mm) to pixels.

    pixel = scale * Rot(angle) * diag(flip, 1) * (world - centre) + pixel_centre
    mm_per_px = 1 / scale. x_world, y_world: world coordinates of every pixel centre (float32).
    """

    def __init__(self, height: int, width: int, centre_world, centre_pixel, scale: float,
                 angle: float, flip: bool):
        self.height, self.width = int(height), int(width)
        self.scale = float(scale)
        self.mm_per_px = 1.0 / self.scale
        c, s = math.cos(angle), math.sin(angle)
        f = -1.0 if flip else 1.0
        # forward linear map M = scale * R * F
        self.m = self.scale * np.array([[c * f, -s], [s * f, c]])
        self.m_inv = np.linalg.inv(self.m)
        self.cw = np.asarray(centre_world, np.float64)
        self.cp = np.asarray(centre_pixel, np.float64)
        jj = np.arange(self.width, dtype=np.float64) + 0.5 - self.cp[0]
        ii = np.arange(self.height, dtype=np.float64) + 0.5 - self.cp[1]
        mi = self.m_inv
        self.x_world = (self.cw[0] + mi[0, 0] * jj[None, :] + mi[0, 1] * ii[:, None]).astype(np.float32)
        self.y_world = (self.cw[1] + mi[1, 0] * jj[None, :] + mi[1, 1] * ii[:, None]).astype(np.float32)

    def to_pixel(self, p) -> np.ndarray:
        """World point(s) (..., 2) -> pixel coordinates (..., 2)."""
        p = np.asarray(p, np.float64)
        return (p - self.cw) @ self.m.T + self.cp

    def window(self, bbox) -> tuple[slice, slice] | None:
        """Pixel slices covering a world bbox (x0, y0, x1, y1); None when off the image."""
        x0, y0, x1, y1 = bbox
        corners = self.to_pixel(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
        c0 = max(int(math.floor(corners[:, 0].min())) - 1, 0)
        c1 = min(int(math.ceil(corners[:, 0].max())) + 1, self.width)
        r0 = max(int(math.floor(corners[:, 1].min())) - 1, 0)
        r1 = min(int(math.ceil(corners[:, 1].max())) + 1, self.height)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> Array:
    """Unit-variance-ish smooth random field (H, W) float32: normal noise on a grid with `cell`
    pixels spacing, bilinearly upsampled."""
    gh = int(math.ceil(height / cell)) + 2
    gw = int(math.ceil(width / cell)) + 2
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    yy = (np.arange(height, dtype=np.float32) + 0.5) / np.float32(cell)
    xx = (np.arange(width, dtype=np.float32) + 0.5) / np.float32(cell)
    y0 = np.floor(yy).astype(np.int64)
    x0 = np.floor(xx).astype(np.int64)
    wy = (yy - y0)[:, None]
    wx = (xx - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - wy) * (1 - wx) + b * (1 - wy) * wx + c * wy * (1 - wx) + d * wy * wx).astype(np.float32)


def gaussian_blur(img: Array, sigma: float) -> Array:
    """Separable Gaussian blur with edge padding (float32 in, float32 out)."""
    if sigma <= 0.05:
        return img
    rad = max(1, int(math.ceil(3.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(img, ((rad, rad), (0, 0)), mode="edge")
    out = sum(k[i] * p[i:i + img.shape[0]] for i in range(2 * rad + 1))
    p = np.pad(out, ((0, 0), (rad, rad)), mode="edge")
    out = sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * rad + 1))
    return out.astype(np.float32, copy=False)


# 5x7 bitmaps for the lead side markers that radiographers put on films.
_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def polygon_plate_density(x: Array, y: Array, verts, thickness: float, mu: float, mu_rim: float,
                          rim: float, px: float, texture: Array | None = None) -> Array:
    """A flat bone (scapular blade) with a convex polygon outline `verts` (world mm, any winding):
    uniform thickness (mm) at attenuation mu, plus a brighter rim `rim` mm wide at mu_rim."""
    v = np.asarray(verts, np.float64)
    area2 = float(np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1]))
    sign = 1.0 if area2 > 0 else -1.0
    depth = None
    for i in range(len(v)):
        a, b = v[i], v[(i + 1) % len(v)]
        e = (b - a) / np.hypot(*(b - a))
        # inward normal of edge a->b
        nrm = sign * np.array([-e[1], e[0]])
        dist = (x - np.float32(a[0])) * np.float32(nrm[0]) + (y - np.float32(a[1])) * np.float32(nrm[1])
        depth = dist if depth is None else np.minimum(depth, dist)
    cover = np.clip(0.5 + depth / np.float32(px), 0.0, 1.0)
    rim_w = np.clip(1.0 - depth / np.float32(rim), 0.0, 1.0) * cover
    body = np.float32(mu) if texture is None else np.float32(mu) * (1.0 + texture)
    return (np.float32(thickness) * (body * cover + np.float32(mu_rim) * rim_w)).astype(np.float32)


def glyph(letter: str) -> Array:
    """(7, 5) bool bitmap of a marker letter."""
    return np.array([[c == "1" for c in row] for row in _GLYPHS[letter]], dtype=bool)
