"""`lafid bench eval`: score generated videos (or, with `--real`, the real target clips) per pose
bucket and overall; writes results.json, results.md and chart.png.

Protocols:
- `lafid` (default): N frames (16) spread evenly over the target (the case's time range for
  real clips, the whole video for generated ones). FaceSim per case = mean over frames with
  a face; a case with no face anywhere (or no video) scores 0 and is counted. FID is one set
  against another: every aligned face crop of the generated videos of a bucket against every
  aligned face crop of that bucket's real target clips; null, with the reason, when either
  side has fewer than `fid_min_crops` crops. CLIP sees RGB frames.
- `consisid`: the public ConsisID/OpenS2V evaluation choices, for comparison with published
  tables: 16 frames at `np.linspace(0, count - 1, 16, dtype=int)`; FaceSim as above (their
  bilinear 224 -> 112 resize for CurricularFace equals the area resize used here: an exact 2x,
  both average 2x2 blocks, tested); "FID" is per frame against the single reference
  face (each side one sample repeated, so it reduces to the squared distance of Inception
  features), averaged over a case's face frames, then over cases; CLIP gets the frames in BGR
  order as OpenCV decodes them, sampled at int(i x count / 16); SCRFD searches frames at 320 px.

Also reported: FaceSim-Arc of each case against the reference of another identity's case
(`facesim_arc_other`): the level two different people score, beside the real one; and
FaceSim-Arc per identity (`facesim_arc_per_identity`, and their mean), so that an identity
with many cases does not weigh more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from lafid.bench.build import load_cases
from lafid.bench.metrics import (ClipScorer, CurricularFace, FaceMeter, Inception, facesim, feature_distance,
                                 frechet_distance, sample_indices)
from lafid.face.pose import BUCKETS
from lafid.storage import write_text_atomic
from lafid.video import MediaError, probe, sample_frames

PROTOCOLS = ("lafid", "consisid")
FID_MIN_CROPS = 500  # face crops on each side below which set-against-set FID is reported as null
NOT_COMPUTED = "not computed"
RESULTS_JSON, RESULTS_MD, CHART = "results.json", "results.md", "chart.png"


def read_frames(source: str, start_s: float = 0.0, end_s: float = float("inf"), max_side: int = 1024) -> list:
    """Every displayed RGB frame of a time range (bench targets are short clips)."""
    return [f for _, f in sample_frames(str(source), start_s, end_s, 1000.0, max_side=max_side)]


@dataclass(frozen=True)
class Span:
    """A video or a part of one: what gets sampled."""
    source: str
    start_s: float
    end_s: float
    fps: float


SPACINGS = ("even", "linspace_int", "stride")


def frame_indices(count: int, n: int, spacing: str = "even") -> list[int]:
    """`n` of `count` frames: `even` spaced with first and last included (rounded), `linspace_int`
    as ConsisID's script takes its frames (`np.linspace(0, count - 1, n, dtype=int)`: truncated), or
    `stride`: frame int(i x count / n), as its CLIP frames."""
    if not count:
        return []
    if spacing == "even":
        return sample_indices(count, n).tolist()
    if spacing == "linspace_int":
        return np.linspace(0, count - 1, n, dtype=int).tolist()
    return [int(i * count / n) for i in range(n)]


def spread(span: Span, n: int, spacing: str = "even", max_side: int = 1024) -> list:
    """`n` frames of a span (see `frame_indices`), decoded in one pass keeping only those; a second
    pass only when the frame count differs from duration x fps (variable frame rate)."""
    count = max(1, int(round((span.end_s - span.start_s) * span.fps)))
    for _ in range(2):
        want, kept, seen = set(frame_indices(count, n, spacing)), {}, 0
        for _, frame in sample_frames(span.source, span.start_s, span.end_s, 1000.0, max_side=max_side):
            if seen in want:
                kept[seen] = frame
            seen += 1
        if seen == count:
            break
        count = seen
    return [kept[i] for i in frame_indices(count, n, spacing) if i in kept]


def generated(path: Path) -> Span | None:
    """A generated video as a span; None when it is missing or cannot be decoded (scored as missing)."""
    try:
        info = probe(str(path))
    except MediaError:
        return None
    return Span(str(path), 0.0, info.duration_s, info.fps or 16.0) if info.frame_count else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class Evaluator:
    def __init__(self, protocol: str = "lafid", frames: int = 16, arcface_dir: str | Path | None = None,
                 curricular: str | Path | None = None, clip_dir: str | Path | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        self.protocol, self.frames = protocol, (16 if protocol == "consisid" else frames)
        self.faces = FaceMeter(arcface_dir, det_size=320 if protocol == "consisid" else 640)
        self.cur = CurricularFace(curricular) if curricular else None
        self.clip = ClipScorer(clip_dir) if clip_dir else None
        self.inception = Inception()

    def models(self) -> dict:
        return {"facesim_arc": f"{self.faces.name} (detector {self.faces.detector_name})",
                "facesim_cur": self.cur.name if self.cur else NOT_COMPUTED,
                "clipscore": self.clip.name if self.clip else NOT_COMPUTED,
                "fid": self.inception.name}

    def reference(self, image: np.ndarray) -> dict:
        found, crops, emb = self.faces.measure([image])
        if not found[0]:
            return {"found": False}
        return {"found": True, "arc": emb[0], "crop": crops[0],
                "cur": self.cur.embed([crops[0]])[0] if self.cur else None}

    def video(self, span: Span, prompt: str, features: bool = True) -> dict:
        """Measurements of a video's sampled frames (Inception features of its face crops if `features`)."""
        chosen = spread(span, self.frames, "linspace_int" if self.protocol == "consisid" else "even")
        found, crops, emb = self.faces.measure(chosen)
        crops = [c for c in crops if c is not None]
        out = {"frames": len(chosen), "faces": int(found.sum()), "arc": emb[found], "crops": crops,
               "features": self.inception.features(crops) if crops and features else np.zeros((0, 2048)),
               "cur": self.cur.embed(crops) if self.cur and crops else None, "clip": None}
        if self.clip is not None and prompt:
            clip_frames = chosen
            if self.protocol == "consisid":  # their CLIP frames: i x count / 16, reaching CLIP in BGR order
                clip_frames = [f[..., ::-1].copy() for f in spread(span, self.frames, "stride")]
            out["clip"] = float(np.mean(self.clip.score(clip_frames, prompt)))
        return out


def _case_scores(ev: Evaluator, case: dict, ref: dict, other: dict | None, m: dict) -> dict:
    has = m["faces"] > 0 and ref["found"]
    arc = float(facesim(ref["arc"], m["arc"]).mean()) if has else 0.0
    row = {"case_id": case["case_id"], "pose_bucket": case["pose_bucket"], "identity_id": case["identity_id"],
           "frames": m["frames"], "faces": m["faces"], "reference_face": ref["found"], "facesim_arc": arc,
           "facesim_arc_other": (float(facesim(other["arc"], m["arc"]).mean()) if m["faces"] else 0.0) if other else None,
           "facesim_cur": (float(facesim(ref["cur"], m["cur"]).mean()) if has else 0.0) if ev.cur else None,
           "clipscore": m["clip"], "missing": m.get("missing", False)}
    if ev.protocol == "consisid":
        ref_feat = ev.inception.features([ref["crop"]])[0] if ref["found"] else None
        row["fid_consisid"] = (float(np.mean([feature_distance(f, ref_feat) for f in m["features"]]))
                               if has else 0.0)
    return row


def _fid(rows: list[dict], gen: dict, real: dict, min_crops: int) -> dict:
    """Set-against-set FID of the rows' generated vs real face crops, or None with the reason when either
    side has fewer than `min_crops` (small sets bias FID upward and make it noise)."""
    a, b = ([x[r["case_id"]] for r in rows if len(x[r["case_id"]])] for x in (gen, real))
    a, b = (np.concatenate(x) if x else np.zeros((0, 2048)) for x in (a, b))
    out = {"fid_crops": [len(a), len(b)], "fid_min_crops": min_crops}
    if min(len(a), len(b)) < max(min_crops, 2):
        return {**out, "fid": None, "fid_note": f"too few face crops ({min(len(a), len(b))} < {max(min_crops, 2)})"}
    return {**out, "fid": frechet_distance(a, b)}


def _aggregate(rows: list[dict], gen: dict, real: dict, protocol: str, is_real: bool, fid_min_crops: int) -> dict:
    out = {"cases": len(rows)}
    if not rows:
        return out
    out["facesim_arc"] = _mean(r["facesim_arc"] for r in rows)
    out["facesim_arc_other"] = _mean(r["facesim_arc_other"] for r in rows)
    out["facesim_cur"] = _mean(r["facesim_cur"] for r in rows) if rows[0]["facesim_cur"] is not None else NOT_COMPUTED
    clips = [r["clipscore"] for r in rows if r["clipscore"] is not None]
    out["clipscore"] = float(np.mean(clips)) if clips else NOT_COMPUTED
    out["detection_rate"] = sum(r["faces"] for r in rows) / max(1, sum(r["frames"] for r in rows))
    out["cases_without_face"] = sum(r["faces"] == 0 for r in rows)
    people = sorted({r["identity_id"] for r in rows})
    out["facesim_arc_per_identity"] = {p: _mean(r["facesim_arc"] for r in rows if r["identity_id"] == p)
                                       for p in people}
    out["facesim_arc_identity_mean"] = _mean(out["facesim_arc_per_identity"].values())
    if protocol == "consisid":
        out["fid"] = _mean(r["fid_consisid"] for r in rows)
    elif is_real:
        out.update(fid=None, fid_note="not applicable (real clips are the reference set)")
    else:
        out.update(_fid(rows, gen, real, fid_min_crops))
    return out


def evaluate(bench: str | Path, out: str | Path, videos: str | Path | None = None, real: bool = False,
             protocol: str = "lafid", frames: int = 16, arcface_dir=None, curricular=None, clip_dir=None,
             on_case: Callable[[dict], None] | None = None, fid_min_crops: int = FID_MIN_CROPS) -> dict:
    """Score a bench; see the module docstring. Returns what results.json holds."""
    bench, out = Path(bench), Path(out)
    if real == (videos is not None):
        raise ValueError("give either VIDEOS (generated videos to score) or --real (score the real target clips)")
    cases = load_cases(bench)
    ev = Evaluator(protocol, frames, arcface_dir, curricular, clip_dir)
    refs = {c["case_id"]: ev.reference(cv2.cvtColor(cv2.imread(str(bench / c["ref_image"])), cv2.COLOR_BGR2RGB))
            for c in cases}
    rows, gen_feats, real_feats = [], {}, {}
    for case in cases:
        target = Span(case["source"], case["start_s"], case["end_s"], float(case["fps"] or 25.0))
        # FID needs the real crops' features unless the real clips are what is scored (lafid protocol)
        tm = ev.video(target, case["prompt"], features=protocol == "consisid" or not real)
        real_feats[case["case_id"]] = tm["features"]
        if real:
            m = tm
        else:
            span = generated(Path(videos) / f"{case['case_id']}.mp4")
            m = ev.video(span, case["prompt"]) if span else {
                "frames": ev.frames, "faces": 0, "arc": np.zeros((0, 1)), "crops": [], "features": np.zeros((0, 2048)),
                "cur": None, "clip": None, "missing": True}
            if not m["frames"]:
                m.update(frames=ev.frames, missing=True)
            gen_feats[case["case_id"]] = m["features"]
        other = next((refs[o["case_id"]] for o in cases if o["identity_id"] != case["identity_id"]
                      and refs[o["case_id"]]["found"]), None)
        row = _case_scores(ev, case, refs[case["case_id"]], other, m)
        rows.append(row)
        if on_case:
            on_case(row)
    buckets = {b: _aggregate([r for r in rows if r["pose_bucket"] == b], gen_feats, real_feats, protocol, real,
                             fid_min_crops) for b in BUCKETS}
    result = {"bench": str(bench.resolve()), "videos": "real target clips" if real else str(Path(videos).resolve()),
              "protocol": protocol, "frames_per_video": ev.frames, "models": ev.models(),
              "overall": _aggregate(rows, gen_feats, real_feats, protocol, real, fid_min_crops), "buckets": buckets,
              "missing_videos": [r["case_id"] for r in rows if r["missing"]], "cases": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(result, indent=2) + "\n", out / RESULTS_JSON)
    write_text_atomic(markdown(result), out / RESULTS_MD)
    chart(result, out / CHART)
    return result


METRICS = ("facesim_arc", "facesim_arc_other", "facesim_cur", "clipscore", "fid", "detection_rate")


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    notes = [f"- {name}: FID {agg['fid_note']}" for name, agg in [*result["buckets"].items(),
                                                                   ("overall", result["overall"])]
             if agg.get("fid_note")]
    lines = [f"# LaFID-Bench results ({result['protocol']} protocol)", "",
             f"Videos: {result['videos']}; {result['frames_per_video']} frames per video.", "",
             "| bucket | cases | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, agg in [*result["buckets"].items(), ("overall", result["overall"])]:
        lines.append(f"| {name} | {agg['cases']} | " + " | ".join(_cell(agg.get(k)) for k in METRICS) + " |")
    lines += ["", "Models:", *[f"- {k}: {v}" for k, v in result["models"].items()]]
    if notes:
        lines += ["", "FID not computed:", *notes]
    if result["missing_videos"]:
        lines += ["", f"Missing videos (scored 0, no face): {', '.join(result['missing_videos'])}"]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """FaceSim-Arc (and the other-identity level) per bucket, as a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [b for b in BUCKETS if result["buckets"][b]["cases"]] + ["overall"]
    aggs = [result["buckets"].get(b, result["overall"]) if b != "overall" else result["overall"] for b in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    ax.bar(x - 0.2, [a.get("facesim_arc") or 0 for a in aggs], 0.4, label="FaceSim-Arc (own reference)")
    ax.bar(x + 0.2, [a.get("facesim_arc_other") or 0 for a in aggs], 0.4, label="another identity's reference")
    ax.set_xticks(x, [f"{n}\n({a['cases']})" for n, a in zip(names, aggs)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("cosine (clamped at 0)")
    ax.set_title(f"LaFID-Bench, {result['protocol']} protocol: {result['videos'].split('/')[-1]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
