"""Synthetic image generators that look enough like the real releases to exercise the converters and the demo.

Only numpy and scipy at module level (no nnunetv2, no torch), so the demo can import `make_isic_like_case` cheaply.
"""

import numpy as np
from scipy import ndimage


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose features are about `scale` pixels wide (cheap: blur a coarse grid, upsample)."""
    coarse_h = max(2, int(np.ceil(height / scale)) + 1)
    coarse_w = max(2, int(np.ceil(width / scale)) + 1)
    coarse = rng.standard_normal((coarse_h, coarse_w)).astype(np.float32)
    field = ndimage.zoom(coarse, (height / coarse_h, width / coarse_w), order=1, mode="nearest", grid_mode=True)
    field = field[:height, :width]
    if field.shape != (height, width):  # zoom can round one short
        field = np.pad(field, ((0, height - field.shape[0]), (0, width - field.shape[1])), mode="edge")
    field = ndimage.gaussian_filter(field, sigma=scale / 3)  # hides the grid that linear upsampling leaves
    return (field - field.mean()) / (field.std() + 1e-6)


def _lesion_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An irregular, single connected blob: a star-shaped region whose radius wobbles with the angle."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy = height * rng.uniform(0.38, 0.62)
    cx = width * rng.uniform(0.38, 0.62)
    base_radius = min(height, width) * rng.uniform(0.16, 0.32)
    elongation = rng.uniform(0.7, 1.3)
    tilt = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) * elongation
    angle = np.arctan2(v, u)
    wobble = np.ones_like(angle)
    for k in range(2, 7):
        wobble += rng.uniform(0.0, 0.22 / k * 2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) < base_radius * np.clip(wobble, 0.45, None)


def _draw_hairs(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    """Boolean map of thin dark curved strands (quadratic Bezier curves), the classic dermoscopy occluder."""
    hairs = np.zeros((height, width), dtype=bool)
    t = np.linspace(0.0, 1.0, 2 * (height + width))[:, None]
    for _ in range(count):
        p0, p1, p2 = (rng.uniform((0, 0), (height, width)) for _ in range(3))
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rows = np.clip(np.round(curve[:, 0]).astype(int), 0, height - 1)
        cols = np.clip(np.round(curve[:, 1]).astype(int), 0, width - 1)
        thickness = 1 + int(rng.integers(0, max(1, min(height, width) // 200) + 1))
        for offset in range(thickness):
            hairs[np.clip(rows + offset, 0, height - 1), cols] = True
    return hairs


def make_isic_like_case(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like RGB image with a pigmented lesion, and the lesion mask.

    Skin with low-frequency texture, uneven illumination (vignette and a linear gradient), an irregular brown lesion
    with mottled pigment and a soft border, and dark hair strands drawn over everything (the mask ignores hairs, as the
    ISIC annotators did). Returns (rgb uint8 HxWx3, mask bool HxW); the mask is never empty.
    """
    if height < 8 or width < 8:
        raise ValueError(f"image too small for a lesion: {height}x{width} (need at least 8x8)")
    skin = np.array([rng.uniform(190, 235), rng.uniform(140, 185), rng.uniform(120, 165)], dtype=np.float32)
    brown = np.array([150.0, 95.0, 68.0], dtype=np.float32) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    lesion_colour = brown * np.float32(rng.uniform(0.4, 0.95))

    texture = _smooth_noise(rng, height, width, scale=max(2.0, min(height, width) / 24))
    mottling = _smooth_noise(rng, height, width, scale=max(2.0, min(height, width) / 10))
    grain = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), sigma=0.8)
    image = skin[None, None, :] * (1.0 + 0.05 * texture[..., None] + 0.05 * grain[..., None])

    mask = _lesion_mask(rng, height, width)
    # a soft border: alpha rises from 0 outside to 1 inside over a few pixels
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), sigma=max(0.8, min(height, width) / 80))
    lesion = lesion_colour[None, None, :] * (1.0 + 0.25 * mottling[..., None])
    image = image * (1 - alpha[..., None]) + lesion * alpha[..., None]

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radial = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2))
    vignette = 1.0 - rng.uniform(0.15, 0.45) * np.clip(radial - 0.55, 0, None) ** 1.5
    gradient_angle = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.0, 0.15) * (
        np.cos(gradient_angle) * (xx / width - 0.5) + np.sin(gradient_angle) * (yy / height - 0.5)
    )
    image = image * (vignette * gradient)[..., None]

    hairs = _draw_hairs(rng, height, width, count=int(rng.integers(0, 7)))
    image[hairs] = image[hairs] * 0.25 + np.float32(15)

    image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask
