"""Clip quality on real footage: burned-in subtitles raise the text area (also after re-encoding),
a talking head moves more than a still, and a pan is camera motion."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest

from lafid import devset, media
from lafid.recipe import Recipe
from lafid.stages.clip_quality import ClipQuality
from conftest import clip_item, run_stage

SUBTITLE = "So I told him we would meet at noon"


def burn(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A white subtitle line with a black outline near the bottom, as players burn captions in."""
    out = []
    for f in frames:
        g = f.copy()
        h, w = g.shape[:2]
        scale = w / 700
        (tw, th), _ = cv2.getTextSize(SUBTITLE, cv2.FONT_HERSHEY_DUPLEX, scale, 1)
        org = ((w - tw) // 2, h - 2 * th)
        cv2.putText(g, SUBTITLE, org, cv2.FONT_HERSHEY_DUPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(g, SUBTITLE, org, cv2.FONT_HERSHEY_DUPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        out.append(g)
    return out


def reencode(src: str, dst: str, *args: str) -> str:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", src, *args, "-an", dst], check=True)
    return dst


@pytest.fixture(scope="module")
def stage():
    s = ClipQuality()
    s.setup()
    return s


def measure(stage, path: str) -> dict:
    [item] = run_stage(stage, [clip_item(path)])
    assert not item.rejected, item.reject
    return item.columns


@pytest.fixture(scope="module")
def subtitled(tmp_path_factory):
    """(plain, subtitled) pairs of 3 s of a real talking head: H.264 CRF 18 at 640 px, and
    re-encoded to CRF 30 at 360 px and to VP9/WebM."""
    root = devset.ensure()
    folder = tmp_path_factory.mktemp("quality")
    plain = reencode(str(root / "WolfgangLanger_Pexels.mp4"), str(folder / "plain.mp4"),
                     "-ss", "10", "-t", "3", "-vf", "scale=640:-2", "-c:v", "libx264", "-crf", "18")
    from lafid.video import sample_frames

    frames = [f for _, f in sample_frames(plain, 0, 3.0, 25.0)]
    sub = media.write_video(str(folder / "sub.mp4"), burn(frames), 25.0)
    pairs = [(plain, sub)]
    for ext, args in ((".crf30.mp4", ("-vf", "scale=-2:360", "-c:v", "libx264", "-crf", "30")),
                      (".webm", ("-c:v", "libvpx-vp9", "-b:v", "300k", "-deadline", "realtime", "-cpu-used", "8"))):
        pairs.append(tuple(reencode(p, p.replace(".mp4", ext), *args) for p in (plain, sub)))
    return pairs


def test_burned_in_subtitles_raise_the_text_area(stage, subtitled):
    for plain, sub in subtitled:
        a, b = measure(stage, plain), measure(stage, sub)
        print(f"{sub.rsplit('/', 1)[1]}: text area {a['text_area']:.4f} -> {b['text_area']:.4f}, "
              f"frames with text {a['text_frames']:.2f} -> {b['text_frames']:.2f}")
        assert b["text_area"] > 0.01 > a["text_area"]  # a subtitle line covers a few % of the frame
        assert b["text_frames"] == 1.0
        assert a["aesthetic"] is None and b["aesthetic"] is None  # no aesthetic model given


def test_text_threshold_rejects_the_subtitled_clip_only(subtitled):
    plain, sub = subtitled[0]
    strict = ClipQuality({"max_text_area": 0.01})
    strict.setup()
    out = run_stage(strict, [clip_item(plain), clip_item(sub)])
    assert [i.reject.reason if i.rejected else None for i in out] == [None, "text_overlay"]


def test_motion_tells_a_talking_head_from_a_still_and_a_pan(stage, tmp_path):
    frames = media.carphone_frames()
    moving = media.write_video(str(tmp_path / "moving.mp4"), frames, 29.97)
    still = media.write_video(str(tmp_path / "still.mp4"), [frames[0]] * len(frames), 29.97)
    photo = cv2.resize(media.grace_hopper(), (480, 360))  # a real photo panned across at 100 px/s
    pan = media.write_video(str(tmp_path / "pan.mp4"), [photo[40:232, 4 * k:4 * k + 256] for k in range(50)], 25.0)
    m, s, p = (measure(stage, v) for v in (moving, still, pan))
    for name, c in (("talking", m), ("still", s), ("pan", p)):
        print(f"{name}: motion {c['motion']:.4f}, camera {c['motion_camera']:.4f}, subject {c['motion_subject']:.4f}")
    assert m["motion"] > 10 * max(s["motion"], 1e-4)
    assert m["motion_subject"] > m["motion_camera"]  # the man moves, the camera barely
    assert p["motion_camera"] > 2 * p["motion_subject"]  # the whole frame moves together
    assert p["motion_camera"] == pytest.approx(100 / 256, rel=0.1)  # frame sides per second


def test_the_stage_fits_after_shot_split_in_a_recipe():
    Recipe.model_validate({"name": "q", "stages": [{"stage": "shot_split"}, {"stage": "clip_quality"}]})


def test_curate_with_the_stage_and_the_report_puts_two_outputs_side_by_side(subtitled, tmp_path):
    """Fig. 5 style: the quality section of `lafid report` compares a subtitled set with a clean one."""
    from lafid.report.html import report
    from lafid.runner import curate

    recipe = Recipe.model_validate({"name": "q", "stages": [{"stage": "shot_split"}, {"stage": "clip_quality"}]})
    clean, burned = tmp_path / "clean", tmp_path / "burned"
    curate(recipe, [p for p, _ in subtitled[:2]], clean, executor="sequential")
    curate(recipe, [s for _, s in subtitled[:2]], burned, executor="sequential")
    runs = report([clean, burned], tmp_path / "r.html", json_path=tmp_path / "r.json")
    a, b = (r.stats["quality"] for r in runs)
    print(f"text area median {a['text_area']['median']:.4f} vs {b['text_area']['median']:.4f}; "
          f"motion median {a['motion']['median']:.4f} vs {b['motion']['median']:.4f}")
    assert a["text_area"]["n"] == b["text_area"]["n"] == 2
    assert b["text_area"]["median"] > 0.01 > a["text_area"]["median"]
    assert b["motion"]["median"] == pytest.approx(a["motion"]["median"], rel=0.2)  # same footage, same motion
    assert a["aesthetic"] is None  # no model: no score, no plot
    html = (tmp_path / "r.html").read_text()
    assert "id=quality" in html and "text_area median" in html and "aesthetic median" not in html


def test_aesthetic_score_comes_from_the_given_onnx(subtitled, tmp_path):
    """The model-folder contract: 1x3x224x224 CLIP-normalised RGB in, one score out. No aesthetic
    weights load here, so the model is an ONNX graph whose score (mean red minus mean blue) the
    test can also compute: a warm-tinted copy of the clip must score higher."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Split", ["image"], ["r", "g", "b"], axis=1, num_outputs=3),
         helper.make_node("Sub", ["r", "b"], ["d"]),
         helper.make_node("ReduceMean", ["d"], ["score"], keepdims=0)],
        "warmth", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "aesthetic.onnx")
    plain = subtitled[0][0]
    from lafid.video import sample_frames

    frames = [f for _, f in sample_frames(plain, 0, 3.0, 25.0)]
    warm = media.write_video(str(tmp_path / "warm.mp4"),
                             [np.clip(f.astype(int) + [40, 0, -40], 0, 255).astype(np.uint8) for f in frames], 25.0)
    scored = ClipQuality({"aesthetic_model": str(tmp_path)})
    scored.setup()
    a, b = (measure(scored, p)["aesthetic"] for p in (plain, warm))
    print(f"aesthetic (warmth model): plain {a:.3f}, warm {b:.3f}")
    assert b > a + 0.3
    with pytest.raises(RuntimeError, match="no aesthetic.onnx"):  # a folder without the file is an error
        ClipQuality({"aesthetic_model": str(tmp_path / "empty")}).setup()
