"""`lafid report` on a real-footage run: counts equal the shards, faces are faces, the page renders in
headless Chromium; the shards read the same in duckdb and HF datasets."""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import lafid
from lafid import media
from lafid.cli import app
from lafid.face.pose import BUCKETS, pose_bucket
from lafid.recipe import Recipe, load_recipe
from lafid.report.sheet import sheet_crop
from lafid.run_record import RUNS, read_runs
from lafid.runner import LOG, curate, recipe_fingerprint
from lafid.schema import SCHEMA_VERSION
from lafid.shards import RecipeChanged


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe on the demo's sample input (real footage), sequential, plus identity clusters."""
    from lafid.identity.cluster import identities

    root = tmp_path_factory.mktemp("report_run")
    inputs = media.make_sample_set(str(root / "input"))
    out = root / "shards"
    curate(load_recipe("demo"), inputs, out, executor="sequential")
    identities(out)
    return inputs, out


def _table(out: Path, kind: str):
    files = sorted(out.glob(f"{kind}-*.parquet"))
    return pq.read_table(files) if len(files) > 1 else pq.read_table(files[0])


def _report(tmp_path: Path, *outs: Path):
    html, js, png = tmp_path / "report.html", tmp_path / "report.json", tmp_path / "png"
    result = CliRunner().invoke(app, ["report", *map(str, outs), "--out", str(html), "--json", str(js),
                                      "--png-dir", str(png)])
    assert result.exit_code == 0, result.output
    return html.read_text(), json.loads(js.read_text()), png


def _expected(inputs: list[str], out: Path) -> dict:
    """The report's counts, computed here straight from the Parquet files."""
    clips, rejects = _table(out, "clips").to_pylist(), _table(out, "rejects").to_pylist()
    frames = Counter(pose_bucket(y, p) for c in clips for y, p in zip(c["frame_yaw"], c["frame_pitch"])
                     if np.isfinite(y) and np.isfinite(p))
    ids = Counter(pq.read_table(out / "identities.parquet")["identity_id"].to_pylist())
    return {
        "input_videos": len(inputs),
        "clips_kept": len(clips),
        "clips_rejected": sum(r["clip_index"] >= 0 for r in rejects),
        "clips_by_bucket": {b: sum(c["pose_bucket"] == b for c in clips) for b in BUCKETS},
        "frames_by_bucket": {b: frames[b] for b in BUCKETS},
        "rejects": Counter(f"{r['stage']}/{r['reason']}" for r in rejects),
        "labels": Counter(c["speaking_label"] for c in clips),
        "identities": len(ids),
        "largest": max(ids.values()),
    }


def _check_counts(stats: dict, want: dict) -> None:
    assert stats["counts"]["input_videos"] == want["input_videos"]
    assert stats["counts"]["clips_kept"] == want["clips_kept"]
    assert stats["counts"]["clips_rejected"] == want["clips_rejected"]
    assert stats["pose"]["clips_by_bucket"] == want["clips_by_bucket"]
    assert stats["pose"]["frames_by_bucket"] == want["frames_by_bucket"]
    assert stats["rejects"] == dict(want["rejects"])
    assert stats["speech"]["labels"] == dict(want["labels"])
    assert stats["identity"]["identities"] == want["identities"]
    assert stats["identity"]["largest"] == want["largest"]
    f = stats["funnel"]
    assert f["clips_cut"] == want["clips_kept"] + want["clips_rejected"]
    assert f["stages"][-1]["clips_out"] == want["clips_kept"]
    lost = sum(sum(s["clips_rejected"].values()) for s in f["stages"])
    assert lost == want["clips_rejected"]


@pytest.fixture(scope="module")
def made(demo_run, tmp_path_factory):
    """`lafid report` of the run, made once: (html text, JSON numbers, PNG folder, HTML path)."""
    folder = tmp_path_factory.mktemp("report_artifacts")  # kept by pytest under its basetemp
    html, stats, png = _report(folder, demo_run[1])
    return html, stats, png, folder / "report.html"


def test_report_counts_equal_the_shards(demo_run, made):
    inputs, out = demo_run
    html, stats, png, _ = made
    want = _expected(inputs, out)
    _check_counts(stats, want)
    # the real footage gives kept clips, a no-face reject, a voice-over and one person in three clips
    assert want["clips_kept"] >= 4 and want["rejects"]["face_constraints/no_face"] >= 1
    assert want["largest"] >= 3
    # the page shows the same numbers
    for key, value in (("counts.clips_kept", want["clips_kept"]), ("counts.input_videos", len(inputs)),
                       ("pose.clips frontal", want["clips_by_bucket"]["frontal"]),
                       ("pose.frames frontal", want["frames_by_bucket"]["frontal"]),
                       ("identity.identities", want["identities"])):
        assert re.search(rf'data-key="{re.escape(key)}">{value}<', html), key
    # run facts: what the output records, and the names of what it does not
    run = stats["run"]
    assert run["recipe"] == ["demo"] and run["executor"] == ["sequential"] and run["wall_s"] > 0
    [record] = read_runs(out)  # the run record the runner wrote, which the facts come from
    assert record["outcome"] == "done" and run["wall_s"] == record["wall_s"] and run["runs"] == 1
    assert (record["videos_total"], record["videos_done"], record["clips_kept"]) == \
        (len(inputs), len(inputs), want["clips_kept"])
    assert run["first_run_started"] == record["started"] and run["run_record"] == RUNS
    assert run["versions"] == [record["versions"]] and record["versions"]["lafid"] == lafid.__version__
    assert run["recipe_fingerprint"] == [recipe_fingerprint(load_recipe("demo"))]
    assert stats["recipe_params"]["face_constraints.sample_fps"] == run["sample_fps"][0] == 8.0
    assert run["id_backend"] == dict(Counter(_table(out, "clips")["id_backend"].to_pylist()))
    assert sum(run["id_backend"].values()) == want["clips_kept"] and run["schema_versions"] == [SCHEMA_VERSION]
    assert "face detector / VAD / ASR models" in run["not_recorded"]
    # plots and crops also as PNG files that decode
    names = {p.name for p in png.iterdir()}
    assert {"funnel.png", "pose_clips.png", "pose_frames.png", "yaw.png", "av_sync.png", "identities.png"} <= names
    assert all(Image.open(p).size[0] > 0 for p in png.iterdir())
    assert len(stats["contact_sheet"]) >= 3
    assert 'http://' not in html and 'https://' not in html


def test_report_follows_the_shards_and_compares_two_runs(demo_run, tmp_path):
    """Control: drop one kept clip from a copy of the output; its report and the comparison see it."""
    inputs, out = demo_run
    copy = tmp_path / "fewer"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("clips-*.parquet"))[0]
    table = pq.read_table(shard)
    dropped = table.slice(0, 1).to_pylist()[0]
    pq.write_table(table.slice(1), shard)
    (copy / RUNS).unlink()  # without the run record, recipe name and wall time are unknown: the log is not parsed
    assert (copy / LOG).exists()
    html, both, _ = _report(tmp_path, out, copy)
    first, second = both["runs"]
    want = _expected(inputs, out)
    _check_counts(first, want)
    assert second["counts"]["clips_kept"] == want["clips_kept"] - 1
    assert second["pose"]["clips_by_bucket"][dropped["pose_bucket"]] == \
        want["clips_by_bucket"][dropped["pose_bucket"]] - 1
    assert second["run"]["wall_s"] is None and second["run"]["recipe"] is None and second["run"]["runs"] == 0
    assert second["run"]["run_record"].startswith("no run record")
    assert first["recipe_params"] and second["recipe_params"] == first["recipe_params"]  # from the manifest
    assert first["label"] != second["label"] and first["label"] in html and second["label"] in html


def test_every_run_is_recorded_however_it_ends(demo_run, tmp_path):
    """A rerun with nothing left to do and a run refused inside (another recipe) each append a record."""
    inputs, out = demo_run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    curate(load_recipe("demo"), inputs, copy, executor="sequential")
    other = Recipe(name="other", stages=[{"stage": "shot_split", "params": {"min_clip_s": 0.5}}])
    with pytest.raises(RecipeChanged):
        curate(other, inputs, copy, executor="sequential")
    first, rerun, refused = read_runs(copy)
    assert first == read_runs(out)[0]
    assert rerun["outcome"] == "done" and rerun["videos_skipped"] == len(inputs) and rerun["videos_done"] == 0
    assert refused["outcome"] == "failed" and refused["error"].startswith("RecipeChanged: ")
    assert refused["recipe"] == "other" and refused["fingerprint"] == recipe_fingerprint(other)
    _, stats, _ = _report(tmp_path, copy)
    assert stats["run"]["runs"] == 3 and stats["run"]["outcomes"] == {"done": 2, "failed": 1}
    assert stats["run"]["recipe"] == ["demo", "other"]


def test_report_of_an_output_without_kept_clips_and_of_a_folder_that_is_none(demo_run, tmp_path):
    inputs, out = demo_run
    only_rejects = tmp_path / "only_rejects"
    shutil.copytree(out, only_rejects)
    for path in [*only_rejects.glob("clips-*.parquet"), only_rejects / "identities.parquet"]:
        path.unlink()
    _, stats, png = _report(tmp_path / "r", only_rejects)
    assert stats["counts"]["clips_kept"] == 0 and stats["contact_sheet"] == [] and stats["identity"] is None
    assert stats["rejects"] == dict(_expected(inputs, out)["rejects"])
    assert stats["counts"]["input_videos"] == len(inputs)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "not a curate output folder" in result.output


def test_contact_sheet_crops_are_faces_from_the_subject_track(demo_run, made):
    import mediapipe as mp

    _, out = demo_run
    html, stats, png, _ = made
    crops = sorted(png.glob("face-*.png"))
    assert len(crops) == len(stats["contact_sheet"]) >= 3
    clips = {c["clip_id"]: c for c in _table(out, "clips").to_pylist()}
    for entry in stats["contact_sheet"]:
        clip = clips[entry["clip_id"]]
        assert entry["t"] in [pytest.approx(t) for t in clip["frame_t"]]
        assert f'href="#clip-0-{entry["clip_id"]}"' in html and f'id="clip-0-{entry["clip_id"]}"' in html
    with mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5) as det:
        def faces(rgb):
            return det.process(np.ascontiguousarray(rgb)).detections or []

        for path in crops:
            assert len(faces(np.asarray(Image.open(path).convert("RGB")))) == 1, path.name
        # control: the same crop geometry away from the subject's box finds no face
        frame = media.carphone_frames()[0]
        assert faces(sheet_crop(frame, [0.0, 0.0, 0.15, 0.15])) == []


CHECK = """<script>window.__errors=[];
addEventListener('error',e=>__errors.push(String(e.message||(e.target&&(e.target.src||'').slice(0,40))||e.type)),true);
addEventListener('securitypolicyviolation',e=>__errors.push('blocked:'+e.blockedURI));
const _err=console.error;console.error=(...a)=>{__errors.push(a.join(' '));_err(...a)};
addEventListener('load',()=>{const p=document.createElement('pre');p.id='lafid-check';
p.textContent=JSON.stringify({images:[...document.images].map(i=>[i.complete,i.naturalWidth,i.alt]),
errors:__errors});document.body.appendChild(p)});</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed and cannot be installed here (apt-get install chromium)")
    return exe


def _browse(exe: str, page: Path, *args: str) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={page.parent / 'chromium-profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def _rendered(exe: str, page: Path) -> dict:
    """Images and errors as the browser saw them, from a copy of the page with a checker injected
    ahead of the page's own content (so the page's security policy still applies to everything else)."""
    checked = page.with_name(f"checked-{page.name}")
    checked.write_text(page.read_text().replace("<head>", "<head>" + CHECK, 1))
    dom = _browse(exe, checked, "--dump-dom")
    found = re.search(r'<pre id="lafid-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html_lib.unescape(found.group(1)))


def test_report_renders_in_headless_chromium(made):
    exe = _chromium()
    html, stats, _, page = made
    folder = page.parent
    seen = _rendered(exe, page)
    plots = html.count('<img src="data:image/png;base64,')
    assert len(seen["images"]) == plots >= 15 + len(stats["contact_sheet"])
    sweeps = [alt for _, _, alt in seen["images"] if alt.startswith("sweep-")]
    assert "sweep-face_constraints.min_blur" in sweeps and len(sweeps) == len(stats["sweeps"]), sweeps
    assert all(complete and width > 0 for complete, width, _ in seen["images"]), seen["images"]
    assert seen["errors"] == []
    shot = folder / "report.png"
    _browse(exe, page, "--window-size=1280,2400", f"--screenshot={shot}")
    gray = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert gray.shape == (2400, 1280) and gray.std() > 20 and (gray < 200).mean() > 0.02
    print(f"screenshot: {shot}")
    # control: a page with one broken image is caught
    broken = folder / "broken.html"
    first = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]{40})', html).group(1)
    broken.write_text(html.replace(first, base64.b64encode(b"not a png image at all, really!!").decode(), 1))
    bad = _rendered(exe, broken)
    assert sum(width == 0 for _, width, _ in bad["images"]) == 1


def test_shards_read_the_same_in_duckdb_and_hf_datasets(demo_run, tmp_path, monkeypatch, capsys):
    """The snippets in docs/schema.md, run as written on the real output: pyarrow, duckdb and HF
    `datasets` give the same rows."""
    import datasets

    _, out = demo_run
    assert out.name == "shards"  # the folder name the snippets use
    monkeypatch.chdir(out.parent)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")

    def rows(table):
        return [json.dumps(r, sort_keys=True, default=bytes.hex) for r in table.sort_by("clip_id").to_pylist()]

    files = sorted(out.glob("clips-*.parquet"))
    want = rows(pq.ParquetDataset(files).read())
    assert len(want) >= 4
    doc = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text()
    section = doc[doc.index("## Reading the shards with other tools"):]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 3 and all(len(s.strip().splitlines()) == 3 for s in snippets)
    for code in snippets:
        scope: dict = {}
        exec(compile(code, "docs/schema.md", "exec"), scope)
        clips = scope["clips"]
        table = clips.with_format("arrow")[:] if isinstance(clips, datasets.Dataset) else clips
        assert rows(table) == want, code
    shown = capsys.readouterr().out
    bucket = pq.ParquetDataset(files).read()["pose_bucket"][0].as_py()
    assert bucket in shown and "pose_bucket" in shown
