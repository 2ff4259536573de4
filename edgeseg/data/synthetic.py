"""A procedural dermoscopy generator: the `synthetic` dataset.

Every command must run on a fresh machine with no download, and the set must be hard enough
that a lightness threshold (Otsu on CIELAB L) clearly loses to a trained model while a small
U-Net trained for a few minutes does not saturate it. Images are built in vectorised batches
(numpy + OpenCV), deterministic by ``(seed, split, chunk)``, so a split never depends on the
size of another split or on how many processes made it.

What an image contains (each with its own probability):
  * skin: tone from light to dark, low-frequency tone variation, erythema, furrow texture,
    fine noise, a few light freckles (not part of the lesion);
  * the lesion: an irregular soft blob (harmonics + domain warp, elongated, rotated) whose
    border is sharp on some sides and fuzzy on others. The ground truth is the 50 % iso-line
    of that soft blob, so fuzzy borders are ambiguous to the eye but exactly defined;
    colour variegation (2-3 pigments), a lighter periphery, pigment network, dots,
    regression areas *lighter than the surrounding skin* (still lesion), satellites and
    radial streaks (thin structures, part of the mask), low-contrast lesions, lesions
    cut by the frame;
  * acquisition: hair crossing the lesion (dark, sometimes light), ruler marks, air bubbles
    with bright rims, gel glare, vignetting and the black corners of a round dermatoscope
    field (the mask stops where the field goes dark), illumination gradients, colour casts,
    defocus blur and sensor noise.
"""
from __future__ import annotations

import math
import multiprocessing as mp

import cv2
import numpy as np

__all__ = ["SPLITS", "GENERATOR_VERSION", "generate_split", "generate_batch"]

#: Split sizes of the synthetic set (train / val / test). Seeds differ per split.
SPLITS = {"train": 2000, "val": 250, "test": 500}
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
#: Bump when the generator changes, so stale caches are not reused.
GENERATOR_VERSION = 1
_NANG = 512
_CHUNK = 100  # images per vectorised batch (OpenCV handles up to 512 channels)

_SKIN_LIGHT = np.array([236, 196, 176], np.float32)
_SKIN_DARK = np.array([160, 110, 82], np.float32)
# RGB pigments: light brown, brown, dark brown, near black, blue-grey, pink-red
_PIGMENTS = np.array(
    [[188, 134, 98], [145, 92, 62], [98, 62, 46], [62, 44, 42], [112, 112, 134], [196, 116, 112]],
    np.float32,
)
_REGRESSION = np.array([[238, 228, 232], [208, 214, 228]], np.float32)


def _lowfreq(rng: np.random.Generator, b: int, grid: int, s: int) -> np.ndarray:
    """b smooth noise fields (b, s, s), roughly zero-mean, unit-ish std."""
    g = rng.standard_normal((grid, grid, b)).astype(np.float32)
    out = cv2.resize(g, (s, s), interpolation=cv2.INTER_CUBIC)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _blur_batch(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (b, s, s) float32 batch in one OpenCV call."""
    y = cv2.GaussianBlur(np.ascontiguousarray(x.transpose(1, 2, 0)), (0, 0), sigma)
    if y.ndim == 2:
        y = y[:, :, None]
    return np.ascontiguousarray(y.transpose(2, 0, 1))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _u(rng, lo, hi, b):
    return rng.uniform(lo, hi, b).astype(np.float32)[:, None, None]


def _lesion_shape(rng: np.random.Generator, b: int, s: int, xx: np.ndarray, yy: np.ndarray):
    """Centre, radius and the signed distance (> 0 inside, pixels) of an irregular blob.

    Returns ``(R, cx, cy, theta, sd)``: radius (b,), centre (b, 1, 1), polar angle and signed
    distance (b, s, s). Lesions pushed against the frame are a bit larger.
    """
    f32 = np.float32
    R = (s * np.exp(rng.uniform(math.log(0.10), math.log(0.40), b))).astype(f32)
    cx = s * (0.5 + 0.10 * rng.standard_normal(b))
    cy = s * (0.5 + 0.10 * rng.standard_normal(b))
    edge = rng.random(b) < 0.18  # pushed against the frame
    side = rng.integers(0, 4, b)
    off = rng.uniform(0.0, 0.15, b) * s
    cx = np.where(edge & (side == 0), off, cx)
    cx = np.where(edge & (side == 1), s - off, cx)
    cy = np.where(edge & (side == 2), off, cy)
    cy = np.where(edge & (side == 3), s - off, cy)
    R = np.where(edge, R * 1.3, R).astype(f32)
    cx, cy = cx.astype(f32)[:, None, None], cy.astype(f32)[:, None, None]
    aspect = _u(rng, 0.6, 1.0, b)
    phi = _u(rng, 0, math.pi, b)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / aspect
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    rfac = _radius_factor(rng, b, s, theta)
    Rb = R[:, None, None]
    warp = _lowfreq(rng, b, 7, s) * _u(rng, 0.04, 0.16, b) * Rb
    sd = Rb * rfac + warp - rho  # signed distance-ish in pixels, > 0 inside
    return R, cx, cy, theta, sd


def _radius_factor(rng: np.random.Generator, b: int, s: int, theta: np.ndarray) -> np.ndarray:
    """Radius factor (b, s, s) as a sum of harmonics of the angle ``theta``.

    Tabulated on ``_NANG`` angles and looked up, rather than evaluated per pixel.
    """
    f32 = np.float32
    irregular = rng.uniform(0.04, 0.30, b).astype(f32)
    ks = np.arange(2, 8)
    amps = (irregular[:, None] * rng.random((b, ks.size)) / ks ** 0.9).astype(f32)
    phases = rng.uniform(0, 2 * math.pi, (b, ks.size)).astype(f32)
    ang = np.linspace(-math.pi, math.pi, _NANG + 1, dtype=f32)
    table = 1 + (amps[:, :, None] * np.cos(ks[None, :, None] * ang[None, None, :]
                                            + phases[:, :, None])).sum(1)
    idx = ((theta + math.pi) * (_NANG / (2 * math.pi))).astype(np.int32).reshape(b, -1)
    return np.take_along_axis(table.astype(f32), idx, 1).reshape(b, s, s)


def _satellites(rng, b, s, R, cx, cy, xx, yy) -> np.ndarray:
    """Signed distance (b, s, s) of up to 3 small satellites around the lesion (-1e3 if none).

    Satellites are part of the lesion, sharp-edged so they are visible where labelled.
    """
    f32 = np.float32
    sat = np.full((b, s, s), -1e3, f32)
    for _ in range(3):
        present = rng.random(b) < 0.22
        a = rng.uniform(0, 2 * math.pi, b)
        d = R * rng.uniform(1.15, 1.7, b)
        sx = (cx[:, 0, 0] + d * np.cos(a)).astype(f32)[:, None, None]
        sy = (cy[:, 0, 0] + d * np.sin(a)).astype(f32)[:, None, None]
        rs = rng.uniform(1.5, 4.0, b).astype(f32)[:, None, None]
        sds = rs - np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2)
        sat = np.where(present[:, None, None], np.maximum(sat, sds), sat)
    return sat


def _soft_border(rng, b, theta, sd, sat):
    """Opacity ``alpha``, ground-truth ``mask`` and the merged signed distance of blob + satellites.

    The border is sharp on some sides and fuzzy on others; the mask is the 50 % iso-line.
    """
    f32 = np.float32
    fuzzy = rng.random(b) < 0.6
    w0 = np.where(fuzzy, rng.uniform(1.5, 5.5, b), rng.uniform(0.35, 1.0, b)).astype(f32)
    psi = _u(rng, 0, 2 * math.pi, b)
    wvar = _u(rng, 0.0, 1.0, b)
    w = w0[:, None, None] * np.exp(wvar * np.cos(theta - psi))
    alpha = np.maximum(_sigmoid(sd / w), _sigmoid(sat / 0.6))
    mask = (sd > 0) | (sat > 0)
    return alpha, mask, np.maximum(sd, sat)


def _streaks(rng, b, s, R, cx, cy) -> np.ndarray:
    """Radial streaks / pseudopods (b, s, s) uint8 in {0, 255}: thin structures, part of the lesion."""
    streak = np.zeros((b, s, s), np.uint8)
    has_streaks = rng.random(b) < 0.22
    for i in np.flatnonzero(has_streaks):
        for _ in range(int(rng.integers(3, 9))):
            a = rng.uniform(0, 2 * math.pi)
            r_in, r_out = R[i] * 0.7, R[i] * rng.uniform(1.15, 1.5)
            p0 = (cx[i, 0, 0] + r_in * math.cos(a), cy[i, 0, 0] + r_in * math.sin(a))
            p1 = (cx[i, 0, 0] + r_out * math.cos(a), cy[i, 0, 0] + r_out * math.sin(a))
            cv2.line(streak[i], (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 255,
                     int(rng.integers(1, 3)), cv2.LINE_8)
    return streak


def _skin(rng, b, s, xx, yy) -> np.ndarray:
    """Skin (b, s, s, 3) float32: tone, tone variation, erythema, furrows and freckles."""
    f32 = np.float32
    tone = _u(rng, 0, 1, b)[..., None]
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.uniform(-10, 10, (b, 1, 1, 3)).astype(f32)
    skin = skin * (1 + 0.06 * _lowfreq(rng, b, 4, s))[..., None]
    ery = np.maximum(_lowfreq(rng, b, 5, s), 0) * _u(rng, 0, 14, b)
    skin = skin + ery[..., None] * np.array([0.6, -0.8, -0.5], f32)
    skin = skin * (1 - _furrows(rng, b, s, xx, yy))[..., None]
    # freckles (distractors, not lesion)
    fr = (rng.random((b, s, s), dtype=f32) < _u(rng, 0.0, 0.0012, b)).astype(f32)
    fr = _blur_batch(fr, 1.3) * 14.0
    return skin * (1 - np.clip(fr, 0, 1) * _u(rng, 0.05, 0.18, b))[..., None]


def _furrows(rng, b, s, xx, yy) -> np.ndarray:
    """Darkening (b, s, s) of two crossing, warped sets of skin furrows."""
    beta = _u(rng, 0, math.pi, b)
    lam = _u(rng, 4.0, 8.0, b)
    fw = _lowfreq(rng, b, 5, s) * 2.5
    furrow = np.sin(2 * math.pi * (xx * np.cos(beta) + yy * np.sin(beta)) / lam + fw)
    furrow2 = np.sin(2 * math.pi * (-xx * np.sin(beta) + yy * np.cos(beta)) / (lam * 1.3) + fw * 0.7)
    tex = np.maximum(furrow, furrow2)
    tex = tex * tex
    tex = tex * tex
    return tex * tex * _u(rng, 0.015, 0.05, b)


def _lesion_colour(rng, b, s, skin, sd, Rb) -> np.ndarray:
    """Lesion colour (b, s, s, 3): 2-3 pigments, low-contrast lesions and a lighter periphery."""
    f32 = np.float32
    p_main = np.array([0.3, 0.35, 0.25, 0.1])
    c1 = _PIGMENTS[rng.choice(4, b, p=p_main)]
    c2 = _PIGMENTS[rng.integers(0, 6, b)]
    c3 = _PIGMENTS[rng.integers(1, 5, b)]
    m1 = _sigmoid(_lowfreq(rng, b, 5, s) * 2.5)[..., None]
    m2 = _sigmoid(_lowfreq(rng, b, 6, s) * 3 - 1.5)[..., None] * _u(rng, 0, 1, b)[..., None]
    col = c1[:, None, None] * (1 - m1) + c2[:, None, None] * m1
    col = col * (1 - m2) + c3[:, None, None] * m2
    low = rng.random(b) < 0.28
    contrast = np.where(low, rng.uniform(0.18, 0.42, b), rng.uniform(0.55, 1.0, b)).astype(f32)
    edge_frac = _u(rng, 0.3, 1.0, b)
    depth = np.sqrt(np.clip(sd / (0.5 * Rb), 0, 1))
    strength = (contrast[:, None, None] * (edge_frac + (1 - edge_frac) * depth))[..., None]
    return skin + (col - skin) * strength


def _lesion_structures(rng, b, s, lesion, sd, Rb) -> np.ndarray:
    """Pigment network, dots / globules and regression areas lighter than the skin."""
    f32 = np.float32
    net = rng.random(b) < 0.4
    nf = _lowfreq(rng, b, 22, s)
    pattern = np.exp(-(nf * nf) * 6.0) * (_u(rng, 0.12, 0.35, b) * net[:, None, None])
    lesion = lesion * (1 - pattern)[..., None]
    dots = (rng.random((b, s, s), dtype=f32) < _u(rng, 0, 0.01, b)).astype(f32)
    dots = np.clip(_blur_batch(dots, 0.8) * 6, 0, 1)
    lesion = lesion * (1 - 0.45 * dots)[..., None]
    reg = np.flatnonzero(rng.random(b) < 0.3)
    rthr, rstr = _u(rng, 0.0, 1.0, b), _u(rng, 0.5, 0.9, b)
    rcol = _REGRESSION[rng.integers(0, 2, b)][:, None, None]
    if reg.size:
        rf = _sigmoid((_lowfreq(rng, reg.size, 5, s) - rthr[reg]) * 5)
        rf = (rf * np.clip(sd[reg] / (0.25 * Rb[reg]), 0, 1) * rstr[reg])[..., None]
        lesion[reg] = lesion[reg] * (1 - rf) + rcol[reg] * rf
    return lesion


def _draw_hair(rng, dark: np.ndarray, light: np.ndarray, s: int) -> None:
    """Up to 30 curved hairs, dark or (rarely) light, drawn into one image's layer."""
    nh = int(min(rng.geometric(0.12), 30))
    tgt = light if rng.random() < 0.12 else dark
    for _ in range(nh):
        p = rng.uniform(-0.1 * s, 1.1 * s, 2)
        ang = rng.uniform(0, 2 * math.pi)
        ln = rng.uniform(0.3, 1.4) * s
        curv = rng.uniform(-0.6, 0.6)
        t = np.linspace(0, 1, 12)
        a = ang + curv * t
        pts = p + np.stack([np.cumsum(np.cos(a)), np.cumsum(np.sin(a))], 1) * ln / 12
        cv2.polylines(tgt, [np.round(pts * 4).astype(np.int32)], False,
                      int(rng.integers(150, 256)), 1 if rng.random() < 0.75 else 2,
                      cv2.LINE_AA, 2)


def _draw_ruler(rng, dark: np.ndarray, s: int) -> None:
    """A ruler with ticks along one edge of one image."""
    horiz = rng.random() < 0.5
    o = int(rng.integers(2, 14))
    o = o if rng.random() < 0.5 else s - 1 - o
    step = int(rng.integers(4, 7))
    for k, q in enumerate(range(int(rng.integers(0, 4)), s, step)):
        ln = 7 if k % 5 == 0 else 4
        d = ln if o < s // 2 else -ln
        p0, p1 = ((q, o), (q, o + d)) if horiz else ((o, q), (o + d, q))
        cv2.line(dark, p0, p1, 230, 1, cv2.LINE_AA)
    p0, p1 = ((0, o), (s - 1, o)) if horiz else ((o, 0), (o, s - 1))
    cv2.line(dark, p0, p1, 230, 1, cv2.LINE_AA)


def _draw_bubbles(rng, bright: np.ndarray, shade: np.ndarray, s: int) -> None:
    """1-5 air bubbles of one image: bright rim, darker inner rim and a highlight."""
    for _ in range(int(rng.integers(1, 6))):
        c = rng.uniform(0, s, 2)
        r = rng.uniform(3, 20)
        ci = (int(c[0] * 4), int(c[1] * 4))
        cv2.circle(bright, ci, int(r * 4), int(rng.integers(120, 230)), 1, cv2.LINE_AA, 2)
        cv2.circle(shade, ci, int(r * 4 * 0.85), int(rng.integers(40, 120)), 1,
                   cv2.LINE_AA, 2)
        hc = (int((c[0] - 0.45 * r) * 4), int((c[1] - 0.45 * r) * 4))
        cv2.circle(bright, hc, int(max(1.0, 0.18 * r) * 4), 255, -1, cv2.LINE_AA, 2)


def _draw_glare(rng, bright: np.ndarray, s: int) -> None:
    """1-3 gel glare ellipses of one image."""
    for _ in range(int(rng.integers(1, 4))):
        c = rng.uniform(0, s, 2)
        ax = (int(rng.uniform(1, 7)), int(rng.uniform(1, 4)))
        cv2.ellipse(bright, (int(c[0]), int(c[1])), ax, rng.uniform(0, 180), 0, 360,
                    int(rng.integers(150, 256)), -1, cv2.LINE_AA)


def _artefact_layers(rng, b: int, s: int):
    """Per-image artefact layers (b, s, s) uint8: ``dark`` (hair, ruler), ``light`` (light
    hair), ``bright`` (bubble rims, glare) and ``shade`` (bubble inner rims)."""
    dark, light, bright, shade = (np.zeros((b, s, s), np.uint8) for _ in range(4))
    for i in range(b):
        if rng.random() < 0.45:
            _draw_hair(rng, dark[i], light[i], s)
        if rng.random() < 0.12:
            _draw_ruler(rng, dark[i], s)
        if rng.random() < 0.28:
            _draw_bubbles(rng, bright[i], shade[i], s)
        if rng.random() < 0.2:
            _draw_glare(rng, bright[i], s)
    return dark, light, bright, shade


def _apply_artefacts(rng, img: np.ndarray, b: int, s: int) -> np.ndarray:
    """Hair, ruler marks, bubbles and glare composited over the image."""
    f32 = np.float32
    dark, light, bright, shade = _artefact_layers(rng, b, s)
    hair_col = rng.uniform(15, 75, (b, 1, 1, 1)).astype(f32) * np.array([1.0, 0.82, 0.7], f32)
    dk = dark.astype(f32)[..., None] / 255.0
    img = img * (1 - dk) + hair_col * dk
    lt = light.astype(f32)[..., None] / 255.0
    img = img * (1 - 0.7 * lt) + 215 * 0.7 * lt
    sh = shade.astype(f32)[..., None] / 255.0
    img = img * (1 - 0.35 * sh)
    br = _blur_batch(bright.astype(f32) / 255.0, 0.6)[..., None]
    return img + (250 - img) * np.clip(br, 0, 1)


def _illumination(rng, img: np.ndarray, b: int, s: int, xx, yy) -> np.ndarray:
    """Illumination gradient, vignetting and a colour cast."""
    ga = _u(rng, 0, 2 * math.pi, b)
    grad = 1 + _u(rng, 0, 0.16, b) * ((xx - s / 2) * np.cos(ga) + (yy - s / 2) * np.sin(ga)) / s
    r2 = ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s * s / 2)
    vig = 1 - _u(rng, 0.0, 0.45, b) * r2 * np.sqrt(r2)
    img = img * (grad * vig)[..., None]
    return img * rng.uniform(0.9, 1.1, (b, 1, 1, 3)).astype(np.float32)


def _scope_field(rng, img: np.ndarray, mask: np.ndarray, b: int, s: int, xx, yy) -> None:
    """Round dermatoscope field with dark corners, in place; the mask stops where it goes dark."""
    scope = rng.random(b) < 0.35
    rc = _u(rng, 0.52, 0.72, b) * s
    ccx = s / 2 + _u(rng, -0.06, 0.06, b) * s
    ccy = s / 2 + _u(rng, -0.06, 0.06, b) * s
    soft = _u(rng, 0.6, 2.5, b)
    outside = rng.uniform(5, 35, (b, 1, 1, 1)).astype(np.float32)
    sc = np.flatnonzero(scope)
    if sc.size:
        dist_c = np.sqrt((xx - ccx[sc]) ** 2 + (yy - ccy[sc]) ** 2)
        field = _sigmoid((rc[sc] - dist_c) / soft[sc])[..., None]
        img[sc] = img[sc] * field + outside[sc] * (1 - field)
        mask[sc] &= field[..., 0] > 0.5


def _defocus_and_noise(rng, img: np.ndarray, b: int, s: int) -> np.ndarray:
    """Defocus blur on some images, then sensor noise on all."""
    f32 = np.float32
    for i in np.flatnonzero(rng.random(b) < 0.3):
        img[i] = cv2.GaussianBlur(img[i], (0, 0), float(rng.uniform(0.5, 1.2)))
    noise = rng.standard_normal((b, s, s, 1), dtype=f32) * _u(rng, 1.5, 6.0, b)[..., None]
    return img + noise * np.array([1.0, 0.9, 1.1], f32)


def generate_batch(rng: np.random.Generator, b: int, s: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``b`` images (b, s, s, 3) uint8 RGB and masks (b, s, s) uint8 in {0, 1}.

    The helpers draw from ``rng`` in a fixed order; reordering them changes the data set
    (bump ``GENERATOR_VERSION`` if you do).
    """
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    xx, yy = xx[None], yy[None]
    R, cx, cy, theta, sd = _lesion_shape(rng, b, s, xx, yy)
    sat = _satellites(rng, b, s, R, cx, cy, xx, yy)
    alpha, mask, sd = _soft_border(rng, b, theta, sd, sat)
    streak = _streaks(rng, b, s, R, cx, cy)
    alpha = np.maximum(alpha, streak.astype(np.float32) / 255.0)
    mask |= streak > 0

    skin = _skin(rng, b, s, xx, yy)
    Rb = R[:, None, None]
    lesion = _lesion_structures(rng, b, s, _lesion_colour(rng, b, s, skin, sd, Rb), sd, Rb)
    img = skin * (1 - alpha[..., None]) + lesion * alpha[..., None]

    img = _apply_artefacts(rng, img, b, s)
    img = _illumination(rng, img, b, s, xx, yy)
    _scope_field(rng, img, mask, b, s, xx, yy)
    img = _defocus_and_noise(rng, img, b, s)
    images = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return images, mask.astype(np.uint8)


def _chunk_job(job):
    seed, k, c = job
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, k, c, GENERATOR_VERSION])
    return generate_batch(rng, _CHUNK, 128)


def generate_split(split: str, n: int | None = None, seed: int = 0, size: int = 128,
                   workers: int | None = None):
    """Images (n, size, size, 3) uint8 RGB and masks (n, size, size) uint8 {0,1} of one split.

    Chunk ``c`` of split ``k`` always comes from ``np.random.default_rng([seed, k, c])``, so
    the first images of a split are identical whatever ``n`` is.
    """
    if split not in _SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}")
    n = SPLITS[split] if n is None else int(n)
    imgs = np.empty((n, 128, 128, 3), np.uint8)
    masks = np.empty((n, 128, 128), np.uint8)
    jobs = [(seed, _SPLIT_INDEX[split], c) for c in range((n + _CHUNK - 1) // _CHUNK)]
    procs = min(workers or 1, len(jobs))  # one process unless asked: a pool costs more than it saves on few cores
    if procs > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(procs) as pool:
            results = pool.map(_chunk_job, jobs)
    else:
        results = [_chunk_job(j) for j in jobs]
    for (_, _, c), (im, m) in zip(jobs, results):
        start = c * _CHUNK
        k = min(_CHUNK, n - start)
        imgs[start:start + k], masks[start:start + k] = im[:k], m[:k]
    if size != 128:
        imgs = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_LINEAR) for x in imgs])
        masks = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_NEAREST) for x in masks])
    return imgs, masks
