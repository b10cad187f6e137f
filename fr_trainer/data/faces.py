"""A parametric face-like image renderer (numpy + Pillow) for the synthetic identities.

An identity is a fixed set of random parameters (face shape, skin tone, skin texture and
moles, eye/brow/nose/mouth geometry, eye colour, hair colour and style, ears, beard,
glasses). A sample perturbs it with nuisances that a face model must learn to ignore:
head pose (yaw/pitch shift the features by their depth, roll/scale/shift are a similarity
transform), expression (smile, open mouth, eye openness, raised brows), lighting (gain,
direction, colour cast, gamma), background and clothes, occluders, blur, sensor noise and
JPEG quality.

Coordinates: the "face frame" is the 112x112 alignment template's frame (FORMATS.md): at
zero pose the eyes, nose tip and mouth corners sit near the template points. A sample is
drawn into any canvas through a similarity `face frame -> canvas`; the five landmarks come
back in canvas coordinates, so aligning them to the template recovers the face.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fr_trainer.eval.align import TEMPLATE_112

TEMPLATE = TEMPLATE_112  # the 5-point alignment template (eval.align owns it)
CENTER = 56.0

HAIR_COLOURS = np.array(
    [
        [20, 16, 14],
        [45, 30, 20],
        [80, 52, 30],
        [120, 80, 45],
        [170, 130, 80],
        [200, 170, 110],
        [130, 50, 25],
        [150, 150, 150],
        [215, 215, 210],
        [60, 40, 40],
    ],
    dtype=np.float32,
)
SKIN_DARK = np.array([75, 45, 30], dtype=np.float32)
SKIN_LIGHT = np.array([240, 205, 180], dtype=np.float32)
EYE_COLOURS = np.array(
    [[60, 35, 20], [100, 65, 35], [70, 110, 140], [60, 120, 80], [120, 120, 90], [30, 20, 15]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Identity:
    """Fixed parameters of one synthetic person (face-frame units, RGB 0..255)."""

    skin: np.ndarray  # [3]
    face_a: float
    face_b: float
    face_cy: float
    chin: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_colour: np.ndarray  # [3]
    iris: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_tilt: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_hw: float
    lip: float
    lip_colour: np.ndarray  # [3]
    hair_colour: np.ndarray  # [3]
    hairline: float
    hair_volume: float
    hair_long: float
    fringe_amp: float
    fringe_freq: float
    fringe_phase: float
    bald: bool
    ear: float
    texture: np.ndarray  # [K, 4] (fx, fy, phase, amplitude)
    moles: np.ndarray  # [M, 3] (x, y, radius)
    beard: float
    glasses: float
    glasses_colour: np.ndarray  # [3]


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation (see the module docstring)."""

    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    gaze: float
    gain: float
    light_angle: float
    light_strength: float
    cast: np.ndarray  # [3]
    gamma: float
    background: np.ndarray  # [2, 3] two colours of a gradient
    clothes: np.ndarray  # [3]
    occluder: np.ndarray | None  # [7]: x0, y0, x1, y1 (face frame), rgb
    blur: float
    noise: float
    quality: int


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity's fixed parameters."""
    tone = rng.beta(2.0, 2.0)
    skin = SKIN_DARK + tone * (SKIN_LIGHT - SKIN_DARK)
    skin = skin * rng.uniform(0.92, 1.08, 3)
    hair_index = rng.integers(len(HAIR_COLOURS))
    hair = HAIR_COLOURS[hair_index] * rng.uniform(0.85, 1.15, 3)
    num_texture = 4
    texture = np.stack(
        [
            rng.uniform(0.1, 0.6, num_texture) * rng.choice([-1, 1], num_texture),
            rng.uniform(0.1, 0.6, num_texture) * rng.choice([-1, 1], num_texture),
            rng.uniform(0, 2 * np.pi, num_texture),
            rng.uniform(0.01, 0.04, num_texture),
        ],
        axis=1,
    )
    num_moles = int(rng.integers(0, 5))
    moles = np.stack(
        [
            rng.uniform(30, 82, num_moles),
            rng.uniform(45, 100, num_moles),
            rng.uniform(0.8, 1.8, num_moles),
        ],
        axis=1,
    )
    lip = skin * np.array([1.0, 0.62, 0.62]) * rng.uniform(0.8, 1.05)
    return Identity(
        skin=skin.astype(np.float32),
        face_a=rng.uniform(31, 40),
        face_b=rng.uniform(41, 52),
        face_cy=rng.uniform(62, 70),
        chin=rng.uniform(0.55, 0.95),
        eye_dx=rng.uniform(15, 20),
        eye_y=rng.uniform(48, 55),
        eye_w=rng.uniform(5.0, 7.5),
        eye_h=rng.uniform(2.4, 3.8),
        eye_colour=(EYE_COLOURS[rng.integers(len(EYE_COLOURS))] * rng.uniform(0.8, 1.2, 3)).astype(
            np.float32
        ),
        iris=rng.uniform(0.75, 1.0),
        brow_gap=rng.uniform(6, 11),
        brow_len=rng.uniform(6.5, 9.5),
        brow_thick=rng.uniform(1.2, 2.8),
        brow_tilt=rng.uniform(-0.25, 0.25),
        nose_y=rng.uniform(68, 76),
        nose_w=rng.uniform(3.5, 7.0),
        mouth_y=rng.uniform(87, 96),
        mouth_hw=rng.uniform(11, 17),
        lip=rng.uniform(1.8, 4.2),
        lip_colour=lip.astype(np.float32),
        hair_colour=hair.astype(np.float32),
        hairline=rng.uniform(20, 36),
        hair_volume=rng.uniform(1.0, 1.25),
        hair_long=rng.uniform(0, 1) if rng.random() < 0.4 else 0.0,
        fringe_amp=rng.uniform(0, 8),
        fringe_freq=rng.uniform(1, 5),
        fringe_phase=rng.uniform(0, 2 * np.pi),
        bald=bool(rng.random() < 0.1),
        ear=rng.uniform(3.5, 6),
        texture=texture.astype(np.float32),
        moles=moles.astype(np.float32),
        beard=rng.uniform(0.3, 0.9) if rng.random() < 0.25 else 0.0,
        glasses=rng.uniform(0.8, 1.8) if rng.random() < 0.15 else 0.0,
        glasses_colour=(rng.uniform(0, 120, 3)).astype(np.float32),
    )


def sample_nuisance(rng: np.random.Generator, difficulty: float = 1.0) -> Nuisance:
    """Draw one image's variation; `difficulty` scales pose and degradation ranges."""
    d = difficulty
    occluder = None
    if rng.random() < 0.08 * d:
        x0, y0 = rng.uniform(10, 80), rng.uniform(30, 95)
        occluder = np.array(
            [x0, y0, x0 + rng.uniform(12, 45), y0 + rng.uniform(8, 30), *rng.uniform(0, 255, 3)],
            dtype=np.float32,
        )
    return Nuisance(
        yaw=float(np.clip(rng.normal(0, 0.28 * d), -0.85, 0.85)),
        pitch=float(np.clip(rng.normal(0, 0.15 * d), -0.45, 0.45)),
        smile=float(rng.uniform(-0.4, 1.0)),
        mouth_open=float(rng.uniform(0, 1) if rng.random() < 0.3 else 0.0),
        eye_open=float(rng.uniform(0.25, 1.15) if rng.random() < 0.3 else rng.uniform(0.8, 1.1)),
        brow_raise=float(rng.uniform(-1.5, 3.0)),
        gaze=float(rng.uniform(-0.35, 0.35)),
        gain=float(rng.uniform(1 - 0.35 * d, 1 + 0.3 * d)),
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0, 0.45 * d)),
        cast=rng.uniform(1 - 0.12 * d, 1 + 0.12 * d, 3).astype(np.float32),
        gamma=float(rng.uniform(0.8, 1.25)),
        background=rng.uniform(0, 255, (2, 3)).astype(np.float32),
        clothes=rng.uniform(0, 255, 3).astype(np.float32),
        occluder=occluder,
        blur=float(rng.uniform(0, 1.4 * d) if rng.random() < 0.5 else 0.0),
        noise=float(rng.uniform(0, 9 * d)),
        quality=int(rng.integers(max(20, int(95 - 60 * d)), 96)),
    )


def similarity(
    scale: float, angle: float, shift: tuple[float, float], canvas_center: tuple[float, float]
) -> np.ndarray:
    """2x3 matrix: face frame -> canvas, rotating/scaling about the template centre."""
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    offset = np.array(canvas_center) + np.array(shift) - rot @ np.array([CENTER, CENTER])
    return np.concatenate([rot, offset[:, None]], axis=1)


def jitter_transform(rng: np.random.Generator, difficulty: float = 1.0) -> np.ndarray:
    """Small similarity for 'aligned' training crops (imperfect alignment)."""
    return similarity(
        scale=float(rng.uniform(1 - 0.08 * difficulty, 1 + 0.08 * difficulty)),
        angle=float(rng.normal(0, 0.07 * difficulty)),
        shift=(float(rng.normal(0, 2.0 * difficulty)), float(rng.normal(0, 2.0 * difficulty))),
        canvas_center=(CENTER, CENTER),
    )


def _unit(x: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (cheaper than np.clip's Python wrapper)."""
    np.maximum(x, 0.0, out=x)
    return np.minimum(x, 1.0, out=x)


@dataclass
class Patch:
    """A soft mask `alpha` [h,w] in 0..1 covering `region` (row slice, column slice) of a canvas."""

    region: tuple[slice, slice]
    alpha: np.ndarray

    def __mul__(self, other: np.ndarray | float) -> Patch:
        """Scale by a number or by a full-canvas mask [H,W]."""
        if isinstance(other, np.ndarray):
            return Patch(self.region, self.alpha * other[self.region])
        return Patch(self.region, self.alpha * other)

    __rmul__ = __mul__


class _Canvas:
    """Pixel grid mapped back into the face frame; layers are alpha-composited onto it."""

    def __init__(self, height: int, width: int, transform: np.ndarray) -> None:
        self.transform = transform
        rot, offset = transform[:, :2], transform[:, 2]
        inverse = np.linalg.inv(rot).astype(np.float32)
        start = -(inverse @ offset).astype(np.float32)  # face-frame point of pixel (0, 0)
        xs = np.arange(width, dtype=np.float32)[None, :]
        ys = np.arange(height, dtype=np.float32)[:, None]
        self.u = inverse[0, 0] * xs + inverse[0, 1] * ys + start[0]
        self.v = inverse[1, 0] * xs + inverse[1, 1] * ys + start[1]
        self.px = float(np.sqrt(abs(np.linalg.det(rot))))  # canvas pixels per face unit
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.full = (slice(0, height), slice(0, width))

    def region(self, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
        """Canvas rows/columns that hold the face-frame disc (cx, cy, radius)."""
        t = self.transform
        x = t[0, 0] * cx + t[0, 1] * cy + t[0, 2]
        y = t[1, 0] * cx + t[1, 1] * cy + t[1, 2]
        r = radius * self.px + 2.0
        h, w = self.u.shape
        rows = slice(min(max(int(y - r), 0), h), min(max(int(y + r) + 2, 0), h))
        cols = slice(min(max(int(x - r), 0), w), min(max(int(x + r) + 2, 0), w))
        return rows, cols

    def ellipse(
        self,
        cx: float,
        cy: float,
        a: float,
        b: float,
        angle: float = 0.0,
        region: tuple[slice, slice] | None = None,
    ) -> Patch:
        """Soft ellipse mask (about one canvas pixel of anti-aliasing) on its bounding box
        (or on `region` when given)."""
        region = region if region is not None else self.region(cx, cy, max(a, b))
        du, dv = self.u[region] - cx, self.v[region] - cy
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            du, dv = c * du + s * dv, -s * du + c * dv
        r = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
        return Patch(region, _unit((1.0 - r) * (min(a, b) * self.px) + 0.5))

    def paint(self, patch: Patch, colour: np.ndarray | float) -> None:
        """image = image * (1 - alpha) + colour * alpha on the patch; colour [3] or [h,w,3]."""
        if patch.alpha.size == 0:
            return
        view = self.image[patch.region]
        view += patch.alpha[..., None] * (colour - view)


def _yaw_x(x: float, depth: float, cx: float, n: Nuisance) -> float:
    return cx + (x - cx) * np.cos(n.yaw) + depth * np.sin(n.yaw)


def _pitch_y(y: float, depth: float, cy: float, n: Nuisance) -> float:
    return cy + (y - cy) * np.cos(n.pitch) + depth * np.sin(n.pitch)


def _landmarks(p: Identity, n: Nuisance) -> np.ndarray:
    """Five face-frame landmarks [5,2] after pose and expression."""
    cx, cy = CENTER, p.face_cy
    mouth_y = p.mouth_y - 3.0 * n.smile
    points = [
        (CENTER - p.eye_dx, p.eye_y, 9.0),
        (CENTER + p.eye_dx, p.eye_y, 9.0),
        (CENTER, p.nose_y, 20.0),
        (CENTER - p.mouth_hw, mouth_y, 9.0),
        (CENTER + p.mouth_hw, mouth_y, 9.0),
    ]
    return np.array([[_yaw_x(x, d, cx, n), _pitch_y(y, d, cy, n)] for x, y, d in points])


def _draw_background(cv: _Canvas, n: Nuisance) -> None:
    h = cv.image.shape[0]
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    cv.image[:] = n.background[0] + ramp * (n.background[1] - n.background[0])


def _draw_head_back(cv: _Canvas, p: Identity, n: Nuisance) -> tuple[float, float, float]:
    """Clothes, neck, hair behind the head and ears; returns the face centre and width."""
    cx = _yaw_x(CENTER, -2.0, CENTER, n)
    cy = p.face_cy
    a = p.face_a * (0.85 + 0.15 * np.cos(n.yaw))
    cv.paint(cv.ellipse(cx, cy + p.face_b * 1.75, p.face_a * 2.2, p.face_b * 0.9), n.clothes)
    cv.paint(cv.ellipse(cx, cy + p.face_b * 0.8, p.face_a * 0.55, p.face_b * 0.6), p.skin * 0.82)
    if not p.bald:
        hair_b = p.face_b * (0.95 + 0.5 * p.hair_long)
        hair_cy = cy - p.face_b * 0.2 + 0.5 * p.hair_long * p.face_b
        cv.paint(cv.ellipse(cx, hair_cy, a * 1.1 * p.hair_volume, hair_b), p.hair_colour)
    for side in (-1.0, 1.0):
        ex = _yaw_x(CENTER + side * p.face_a * 0.98, -8.0, CENTER, n)
        cv.paint(cv.ellipse(ex, p.eye_y + 8.0, p.ear, p.ear * 2.0), p.skin * 0.9)
    return cx, cy, a


def _draw_skin(cv: _Canvas, p: Identity, n: Nuisance, cx: float, cy: float, a: float) -> np.ndarray:
    """Face oval with texture, moles and shading; returns its mask [H,W] (full canvas)."""
    region = cv.region(cx, cy, max(a, p.face_b) + 1.0)
    u, v = cv.u[region], cv.v[region]
    du, dv = u - cx, v - cy
    width = a * (1.0 - (1.0 - p.chin) * np.clip(dv / p.face_b, 0.0, 1.0) ** 2)
    r = np.sqrt((du / width) ** 2 + (dv / p.face_b) ** 2)
    alpha = _unit((1.0 - r) * (a * cv.px) + 0.5)
    texture = np.zeros_like(u)
    for fx, fy, phase, amplitude in p.texture:
        texture += amplitude * np.sin(fx * u + fy * v + phase)
    shade = (1.0 + texture - 0.28 * np.clip(r, 0, 1) ** 4)[..., None]
    cv.paint(Patch(region, alpha), p.skin * shade)
    mask = np.zeros_like(cv.u)
    mask[region] = alpha
    for x, y, radius in p.moles:
        mx, my = _yaw_x(float(x), 12.0, CENTER, n), _pitch_y(float(y), 12.0, cy, n)
        cv.paint(cv.ellipse(mx, my, radius, radius) * mask, p.skin * 0.45)
    return mask


def _draw_hair_front(
    cv: _Canvas, p: Identity, n: Nuisance, face: np.ndarray, cx: float, cy: float
) -> None:
    if p.bald:
        return
    region = cv.region(cx, cy, max(p.face_a, p.face_b) + 1.0)
    top = cy - p.face_b + p.hairline + 4.0 * np.sin(n.pitch)
    line = top + p.fringe_amp * np.cos(
        p.fringe_freq * (cv.u[region] - cx) / p.face_a + p.fringe_phase
    )
    alpha = _unit((line - cv.v[region]) * cv.px + 0.5)
    cv.paint(Patch(region, alpha) * face, p.hair_colour)


def _draw_eyes(cv: _Canvas, p: Identity, n: Nuisance, lm: np.ndarray, face: np.ndarray) -> None:
    squeeze = np.cos(n.yaw) ** 0.5
    for index, side in ((0, -1.0), (1, 1.0)):
        ex, ey = lm[index]
        w = p.eye_w * squeeze
        h = max(p.eye_h * n.eye_open, 0.4)
        sclera = cv.ellipse(ex, ey, w, h)
        cv.paint(sclera * face, np.array([235, 230, 225], np.float32))
        radius = p.eye_h * p.iris
        ix = ex + n.gaze * w
        for scale, colour in ((1.0, p.eye_colour), (0.45, np.array([10, 10, 10], np.float32))):
            iris = cv.ellipse(ix, ey, radius * scale, radius * scale, region=sclera.region)
            cv.paint(Patch(sclera.region, iris.alpha * sclera.alpha), colour)
        by = ey - p.brow_gap - n.brow_raise
        tilt = side * p.brow_tilt
        cv.paint(
            cv.ellipse(ex, by, p.brow_len * squeeze, p.brow_thick, tilt) * face, p.hair_colour * 0.8
        )
        if p.glasses:
            ring = cv.ellipse(ex, ey, w + 4.5, w + 3.0)
            inner = cv.ellipse(ex, ey, w + 4.5 - p.glasses, w + 3.0 - p.glasses, region=ring.region)
            cv.paint(Patch(ring.region, np.clip(ring.alpha - inner.alpha, 0, 1)), p.glasses_colour)
    if p.glasses:
        mid_x = 0.5 * (lm[0, 0] + lm[1, 0])
        cv.paint(cv.ellipse(mid_x, lm[0, 1] - 1.0, 4.0, p.glasses * 0.5), p.glasses_colour)


def _draw_nose(cv: _Canvas, p: Identity, lm: np.ndarray, face: np.ndarray) -> None:
    nx, ny = lm[2]
    bridge_x = 0.5 * (lm[0, 0] + lm[1, 0])
    angle = np.arctan2(nx - bridge_x, ny - lm[0, 1])
    length = 0.5 * (ny - lm[0, 1])
    cv.paint(
        0.35 * cv.ellipse(0.5 * (nx + bridge_x), ny - length, 1.6, length, -angle) * face,
        p.skin * 0.7,
    )
    cv.paint(0.5 * cv.ellipse(nx, ny - 1.0, p.nose_w, 3.5) * face, p.skin * 1.08)
    for side in (-1.0, 1.0):
        cv.paint(cv.ellipse(nx + side * p.nose_w * 0.55, ny + 1.0, 1.4, 0.9) * face, p.skin * 0.35)


def _draw_mouth(cv: _Canvas, p: Identity, n: Nuisance, lm: np.ndarray, face: np.ndarray) -> None:
    left, right = lm[3], lm[4]
    mx, my = 0.5 * (left + right)
    hw = max(0.5 * (right[0] - left[0]), 4.0)
    lift = 3.0 * n.smile
    open_h = p.lip * 1.6 * n.mouth_open
    lips_h = p.lip + open_h
    region = cv.region(mx, my, hw + lips_h + abs(lift) + 1.0)
    u, v = cv.u[region], cv.v[region]
    du = u - mx
    # Curved mouth: corners (|du| = hw) at `my`, the middle `lift` lower (a smile for lift > 0).
    dv = v + lift * ((du / hw) ** 2 - 1.0) - my
    r = np.sqrt((du / hw) ** 2 + (dv / lips_h) ** 2)
    lips = Patch(region, _unit((1.0 - r) * (lips_h * cv.px) + 0.5)) * face
    cv.paint(lips, p.lip_colour)
    inner_h = max(open_h, 0.35)
    r_inner = np.sqrt((du / (hw * 0.85)) ** 2 + (dv / inner_h) ** 2)
    inner = _unit((1.0 - r_inner) * (inner_h * cv.px) + 0.5)
    cv.paint(Patch(region, inner) * face, np.array([40, 15, 15], np.float32))
    if p.beard:
        beard_region = cv.region(mx, my, p.face_a + 2.0)
        below = np.clip((cv.v[beard_region] - (lm[2, 1] + 6.0)) * cv.px, 0, 1)
        lips_full = np.zeros_like(cv.u)
        lips_full[region] = lips.alpha
        pattern = 0.7 + 0.3 * np.sin(3.1 * cv.u[beard_region]) * np.sin(2.3 * cv.v[beard_region])
        stubble = Patch(beard_region, p.beard * below * pattern) * (face * (1.0 - lips_full))
        cv.paint(stubble, p.hair_colour * 0.9)


def _draw_occluder(cv: _Canvas, n: Nuisance) -> None:
    x0, y0, x1, y1 = (float(value) for value in n.occluder[:4])
    region = cv.region(0.5 * (x0 + x1), 0.5 * (y0 + y1), 0.75 * max(x1 - x0, y1 - y0))
    u, v = cv.u[region], cv.v[region]
    box = (
        np.clip((u - x0) * cv.px, 0, 1)
        * np.clip((x1 - u) * cv.px, 0, 1)
        * np.clip((v - y0) * cv.px, 0, 1)
        * np.clip((y1 - v) * cv.px, 0, 1)
    )
    cv.paint(Patch(region, box), n.occluder[4:])


def _apply_light(cv: _Canvas, n: Nuisance) -> np.ndarray:
    """Gain, directional light, colour cast, then gamma (by lookup): -> uint8 [H,W,3]."""
    h, w = cv.image.shape[:2]
    ys = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    direction = 2.0 * (np.cos(n.light_angle) * xs + np.sin(n.light_angle) * ys)
    light = (n.gain * (1.0 + n.light_strength * direction))[..., None] * n.cast
    linear = np.clip(cv.image * light + 0.5, 0, 255).astype(np.uint8)
    lut = np.clip((np.arange(256) / 255.0) ** n.gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lut[linear]


def render(
    p: Identity, n: Nuisance, transform: np.ndarray, size: tuple[int, int] = (112, 112)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw identity `p` with variation `n` through `transform` (2x3, face frame -> canvas).

    `size` is (height, width). Returns (image uint8 [H,W,3] before blur/noise/JPEG,
    landmarks [5,2] in canvas pixels).
    """
    cv = _Canvas(size[0], size[1], transform)
    lm = _landmarks(p, n)
    _draw_background(cv, n)
    cx, cy, a = _draw_head_back(cv, p, n)
    face = _draw_skin(cv, p, n, cx, cy, a)
    _draw_hair_front(cv, p, n, face, cx, cy)
    _draw_eyes(cv, p, n, lm, face)
    _draw_nose(cv, p, lm, face)
    _draw_mouth(cv, p, n, lm, face)
    if n.occluder is not None:
        _draw_occluder(cv, n)
    pixels = _apply_light(cv, n)
    landmarks = lm @ transform[:, :2].T + transform[:, 2]
    return pixels, landmarks


def degrade_jpeg(pixels: np.ndarray, n: Nuisance, rng: np.random.Generator) -> bytes:
    """Optics blur, then sensor noise (luma + chroma), then JPEG: uint8 [H,W,3] -> bytes."""
    image = Image.fromarray(pixels, "RGB")
    if n.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(n.blur))
    if n.noise > 0:
        array = np.asarray(image, dtype=np.float32)
        luma = rng.standard_normal(array.shape[:2], dtype=np.float32)
        chroma = rng.standard_normal(array.shape, dtype=np.float32)
        array += n.noise * luma[..., None] + (0.5 * n.noise) * chroma + 0.5
        np.clip(array, 0, 255, out=array)
        image = Image.fromarray(array.astype(np.uint8), "RGB")
    return encode_jpeg(image, n.quality)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes of a PIL image at `quality`."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def render_jpeg(
    p: Identity,
    n: Nuisance,
    transform: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int] = (112, 112),
) -> tuple[bytes, np.ndarray]:
    """`render` + blur + JPEG: (JPEG bytes, landmarks [5,2] in canvas pixels)."""
    pixels, landmarks = render(p, n, transform, size)
    return degrade_jpeg(pixels, n, rng), landmarks
