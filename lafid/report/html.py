"""`lafid report`: one self-contained HTML page (plots, face crops, run facts) per curate output.

`collect` computes every number (the same numbers go to `--json`), `figures` draws
them, `sheet` cuts face crops from the source videos, and `render` puts it all in
one HTML file whose images are embedded as base64 data URIs: it opens from disk and
loads nothing from the network (its content security policy forbids it). Two
outputs side by side (`lafid report A B`) share every plot, one colour per run.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from lafid.face.pose import BUCKETS
from lafid.report.collect import QUALITY_KEYS, Run, collect
from lafid.report.figures import figures
from lafid.report.sheet import contact_sheet

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.figs img{flex:0 0 auto;max-width:100%;height:auto;border:1px solid #eee}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:118px;font-size:10px;text-align:center}
.sheet img{width:112px;height:112px;border:1px solid #ccc}.missing{width:112px;height:112px;background:#eee;
display:flex;align-items:center;justify-content:center}code{font-size:12px}.note{color:#666}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, name: str = "") -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}"'
            f'{f" id={chr(34)}fig-{_e(name)}{chr(34)}" if name else ""}>')


def _fmt(v: Any) -> str:
    if v is None:
        return '<span class="note">-</span>'
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"<code>{_e(json.dumps(v, sort_keys=True))}</code>"
    return _e(v)


def _table(runs: list[Run], rows: list[tuple[str, list[Any]]], key: str = "") -> str:
    head = "".join(f"<th>{_e(r.label)}</th>" for r in runs)
    body = "".join(
        f'<tr><th>{_e(name)}</th>'
        + "".join(f'<td class="n" data-key="{_e(key + name)}">{_fmt(v)}</td>' for v in vals) + "</tr>"
        for name, vals in rows)
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _pose_table(runs: list[Run]) -> str:
    """EFHQ buckets down, clips and sampled face frames of each run across."""
    head = "".join(f"<th>{_e(r.label)}: clips</th><th>{_e(r.label)}: frames</th>" for r in runs)
    body = "".join(
        f"<tr><th>{b}</th>" + "".join(
            f'<td class="n" data-key="pose.clips {b}">{r.stats["pose"]["clips_by_bucket"][b]}</td>'
            f'<td class="n" data-key="pose.frames {b}">{r.stats["pose"]["frames_by_bucket"][b]}</td>' for r in runs)
        + "</tr>" for b in BUCKETS)
    return f"<table><tr><th>EFHQ bucket</th>{head}</tr>{body}</table>"


def _summary_rows(runs: list[Run], section: str, names: list[str]) -> list[tuple[str, list[Any]]]:
    rows = []
    for name in names:
        vals = [(r.stats[section].get(name) or {}) for r in runs]
        rows.append((f"{name} median", [v.get("median") for v in vals]))
        rows.append((f"{name} min..max", [f"{v['min']:.4g} .. {v['max']:.4g}" if v else None for v in vals]))
    return rows


def _figs(figs: dict[str, bytes], names: list[str]) -> str:
    return '<div class="figs">' + "".join(_img(figs[n], n, n) for n in names if n in figs) + "</div>"


def _faces(runs: list[Run], sheets: list[list[dict[str, Any]]]) -> str:
    """The contact sheet: a few faces per EFHQ bucket, each linking its clip's row."""
    parts = ["<h2 id=faces>Faces by pose bucket</h2>",
             '<p class="note">Cut from the source videos when this report was made, along each clip\'s subject '
             "track (<code>frame_box</code> at <code>frame_t</code>); the most frontal frame for "
             "<i>frontal</i>, the most extreme for the other buckets.</p>"]
    for k, (run, sheet) in enumerate(zip(runs, sheets)):
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.label)}</h3>")
        for bucket in BUCKETS:
            faces = [s for s in sheet if s["bucket"] == bucket]
            if not faces:
                continue
            cells = []
            for s in faces:
                pic = (_img(s["png"], f"{bucket} face of clip {s['clip_id']}") if s["png"]
                       else '<div class="missing">source unavailable</div>')
                cells.append(f'<figure><a href="#clip-{k}-{_e(s["clip_id"])}">{pic}</a><figcaption>'
                             f'{_e(s["clip_id"])}<br>yaw {s["yaw"]:.0f} pitch {s["pitch"]:.0f}</figcaption></figure>')
            parts.append(f"<p><b>{_e(bucket)}</b></p><div class=sheet>{''.join(cells)}</div>")
        empty = [b for b in BUCKETS if not any(s["bucket"] == b for s in sheet)]
        if empty:
            parts.append(f'<p class="note">No face frames in: {", ".join(empty)}.</p>')
        shown = {s["clip_id"]: s for s in sheet}
        if shown:
            rows = "".join(f'<tr id="clip-{k}-{_e(c)}"><td><code>{_e(c)}</code></td><td>{_e(s["source"])}</td>'
                           f'<td class="n">{s["start_s"]:.2f}</td><td class="n">{s["t"]:.2f}</td></tr>'
                           for c, s in shown.items())
            parts.append("<table><tr><th>clip_id</th><th>source</th><th>clip start, s</th>"
                         f"<th>face at, s from clip start</th></tr>{rows}</table>")
    return "\n".join(parts)


def render(runs: list[Run], figs: dict[str, bytes], sheets: list[list[dict[str, Any]]]) -> str:
    """The whole page as one HTML string (no external references)."""
    title = "lafid report: " + " vs ".join(r.label for r in runs)
    counts = [(k, [r.stats["counts"][k] for r in runs]) for k in runs[0].stats["counts"]]
    nav = " · ".join(f'<a href="#{k}">{v}</a>' for k, v in (
        ("faces", "faces"), ("funnel", "funnel"), ("pose", "pose"), ("clips", "clips"), ("identity", "identity"),
        ("speech", "speech"), ("quality", "quality"), ("sweeps", "threshold sweeps"), ("run", "run facts")))
    parts = [f"<h1>{_e(title)}</h1>",
             "<p>" + "<br>".join(f"<b>{_e(r.label)}</b>: <code>{_e(r.out_dir)}</code>" for r in runs) + "</p>",
             f"<p>{nav}</p>",
             "<h2 id=counts>Counts</h2>",
             '<div class="figs">' + _table(runs, counts, "counts.") + _img(figs["funnel"], "funnel", "funnel")
             + "</div>",
             _faces(runs, sheets),
             "<h2 id=funnel>Reject funnel</h2>", '<div class="figs">', _img(figs["rejects"], "rejects", "rejects")]
    for k, run in enumerate(runs):
        f = run.stats["funnel"]
        rows = [("input videos", [f["input_videos"]]), ("videos rejected", [f["videos_rejected"]]),
                ("clips cut", [f["clips_cut"]])]
        for s in f["stages"]:
            lost = {**{f"video/{r}": n for r, n in s["videos_rejected"].items()},
                    **{f"clip/{r}": n for r, n in s["clips_rejected"].items()}}
            rows.append((f"{s['stage']}: in / rejected / out",
                         [f"{s['clips_in'] if s['clips_in'] is not None else '-'} / "
                          f"{sum(s['clips_rejected'].values())} / {s['clips_out']}"]))
            rows.append((f"{s['stage']}: reasons", [lost or None]))
        rows.append(("clips kept", [f["clips_kept"]]))
        parts.append(_table([run], rows, f"funnel.{k}."))
    parts += ["</div>", "<h2 id=pose>Head pose</h2>",
              _pose_table(runs),
              _figs(figs, ["pose_clips", "pose_frames", "yaw", "pitch", "yaw_range"]),
              "<h2 id=clips>Clips</h2>",
              _table(runs, _summary_rows(runs, "clips", ["duration_s", "face_area_median", "blur_median"]),
                     "clips."),
              _figs(figs, ["duration", "clips_per_video", "face_area", "blur"]),
              "<h2 id=identity>Identity</h2>"]
    if any(r.stats["identity"] for r in runs):
        parts.append(_table(runs, [(k, [(r.stats["identity"] or {}).get(k) for r in runs])
                                   for k in ("clips", "identities", "largest")], "identity."))
        parts.append(_figs(figs, ["identities"]))
    else:
        parts.append('<p class="note">No identities.parquet: run <code>lafid identities DIR</code> '
                     "to cluster clips by person.</p>")
    labels = sorted({k for r in runs for k in r.stats["speech"]["labels"]})
    parts += ["<h2 id=speech>Speech</h2>",
              _table(runs, [(lab, [r.stats["speech"]["labels"].get(lab, 0) for r in runs]) for lab in labels]
                     + _summary_rows(runs, "speech", ["speech_ratio"]), "speech."),
              _figs(figs, ["speaking", "av_sync", "speech_ratio"])]
    parts.append("<h2 id=quality>Quality</h2>")
    measured = [k for k in QUALITY_KEYS if any(r.stats["quality"][k] for r in runs)]
    parts.append(_table(runs, _summary_rows(runs, "quality", measured), "quality.") + _figs(figs, measured)
                 if measured else '<p class="note">No quality columns: add the <code>clip_quality</code> stage '
                 "to the recipe to measure motion, burned-in text and (with a model) aesthetics.</p>")
    parts.append("<h2 id=sweeps>Threshold sweeps</h2>"
                 '<p class="note">Clips each threshold would keep at other values, the others as recorded, '
                 "decided again from the stored measurements (what <code>lafid filter</code> gives).</p>")
    sweep_names = sorted(k for k in figs if k.startswith("sweep-"))
    parts.append(_figs(figs, sweep_names) if sweep_names else
                 '<p class="note">This output does not record its recipe\'s parameters: no sweeps.</p>')
    parts.append("<h2 id=run>Run facts</h2>"
                 '<p class="note">What the output folder records about the run that made it. Keys under '
                 "<i>not_recorded</i> are not written by the run.</p>")
    keys = list(dict.fromkeys(k for r in runs for k in r.stats["run"]))
    parts.append(_table(runs, [(k, [r.stats["run"].get(k) for r in runs]) for k in keys], "run."))
    if any(r.stats["recipe_params"] for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in (r.stats["recipe_params"] or {})))
        parts.append("<h3>Recipe parameters</h3>")
        parts.append(_table(runs, [(k, [(r.stats["recipe_params"] or {}).get(k) for r in runs]) for k in keys],
                            "param."))
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def report(out_dirs: list[str | Path], html_path: str | Path | None = None, png_dir: str | Path | None = None,
           json_path: str | Path | None = None, per_bucket: int = 6) -> list[Run]:
    """Collect, plot and write the report of one output (or several, side by side)."""
    runs = [collect(d) for d in out_dirs]
    if len({r.label for r in runs}) < len(runs):
        for k, r in enumerate(runs):
            r.label = r.stats["label"] = f"{k + 1}: {r.out_dir}"
    figs = figures(runs)
    sheets = [contact_sheet(r, per_bucket) for r in runs]
    for run, sheet in zip(runs, sheets):
        run.stats["contact_sheet"] = [{k: v for k, v in s.items() if k != "png"} for s in sheet]
    if html_path is not None:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(render(runs, figs, sheets))
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, png in figs.items():
            (png_dir / f"{name}.png").write_bytes(png)
        for k, sheet in enumerate(sheets):
            for s in sheet:
                if s["png"]:
                    prefix = f"run{k + 1}-" if len(runs) > 1 else ""
                    (png_dir / f"{prefix}face-{s['bucket']}-{s['clip_id']}.png").write_bytes(s["png"])
    if json_path is not None:
        data = runs[0].stats if len(runs) == 1 else {"runs": [r.stats for r in runs]}
        Path(json_path).write_text(json.dumps(data, indent=1, sort_keys=True))
    return runs

