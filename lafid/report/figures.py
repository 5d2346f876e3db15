"""The report's plots: matplotlib figures of `collect`'s numbers, as PNG bytes; several runs share each plot,
one colour per run."""

from __future__ import annotations

import io

import numpy as np

from lafid.face.pose import BUCKETS
from lafid.report.collect import PITCH_EDGES, QUALITY_PLOTS, YAW_EDGES, YAW_RANGE_EDGES, Run

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _figure(width: float = 5.2, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bars(runs: list[Run], title: str, keys: list[str], get, ylabel: str, horizontal: bool = False) -> bytes:
    fig, ax = _figure(5.2, max(1.8, 0.3 * len(keys) + 1.2) if horizontal else 3.0)
    width = 0.8 / len(runs)
    pos = np.arange(len(keys))
    for k, run in enumerate(runs):
        vals = [get(run, key) for key in keys]
        at = pos - 0.4 + width * (k + 0.5)
        bars = (ax.barh if horizontal else ax.bar)(at, vals, width, label=run.label, color=COLOURS[k % 4])
        ax.bar_label(bars, fontsize=7, padding=1)
    if horizontal:
        ax.set_yticks(pos, keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(pos, keys, fontsize=8, rotation=20 if max(map(len, keys), default=0) > 8 else 0)
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig)


def _hists(runs: list[Run], key: str, title: str, xlabel: str, edges: np.ndarray | None = None,
           log: bool = False) -> bytes:
    fig, ax = _figure()
    data = [run.values.get(key, np.array([])) for run in runs]
    data = [d[np.isfinite(d)] for d in data]
    if edges is None:
        both = np.concatenate(data) if data else np.array([])
        if log:
            both = both[both > 0]
        lo, hi = (both.min(), both.max()) if len(both) else ((1.0, 10.0) if log else (0.0, 1.0))
        edges = (np.geomspace(lo, hi if hi > lo else lo * 10, 25) if log
                 else np.linspace(lo, hi if hi > lo else lo + 1, 25))
    for k, (run, d) in enumerate(zip(runs, data)):
        ax.hist(np.clip(d, edges[0], edges[-1]), bins=edges, histtype="stepfilled" if len(runs) == 1 else "step",
                linewidth=1.5, alpha=0.8, color=COLOURS[k % 4], label=f"{run.label} (n={len(d)})")
    if log:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    return _save(fig)


def _sync(runs: list[Run]) -> bytes:
    fig, ax = _figure()
    labels = sorted({lab for run in runs for lab in run.sync_by_label})
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        for j, lab in enumerate(labels):
            v = run.sync_by_label.get(lab, np.array([]))
            v = v[np.isfinite(v)]
            x = j - 0.4 + width * (k + 0.5) + np.linspace(-width / 4, width / 4, len(v)) if len(v) else []
            ax.scatter(x, v, s=12, color=COLOURS[k % 4], label=run.label if j == 0 else None)
            if len(v):
                ax.hlines(np.median(v), j - 0.4 + width * k, j - 0.4 + width * (k + 1), color=COLOURS[k % 4])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("av_sync (lip motion vs speech envelope)")
    ax.set_title("audio-visual sync per speaking label (line: median)", fontsize=10)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig)


def _funnel_plot(runs: list[Run]) -> bytes:
    steps = ["input videos", "videos with clips", "clips cut"]
    stage_names = [s["stage"] for s in runs[0].stats["funnel"]["stages"] if s["clips_in"] is not None]
    for run in runs[1:]:
        stage_names += [s["stage"] for s in run.stats["funnel"]["stages"]
                        if s["clips_in"] is not None and s["stage"] not in stage_names]
    steps += [f"after {s}" for s in stage_names]

    def value(run: Run, step: str) -> int:
        f = run.stats["funnel"]
        if step == "input videos":
            return f["input_videos"]
        if step == "videos with clips":
            return f["videos_with_clips"]
        if step == "clips cut":
            return f["clips_cut"]
        by = {s["stage"]: s["clips_out"] for s in f["stages"]}
        return by.get(step[6:], f["clips_kept"])

    return _bars(runs, "reject funnel: inputs -> clips -> kept", steps, value, "videos / clips", horizontal=True)


def figures(runs: list[Run]) -> dict[str, bytes]:
    """Every plot as PNG bytes, keyed by a file-name-safe name."""
    def stat(*path):
        def get(run: Run, key: str) -> float:
            d = run.stats
            for p in path:
                d = d[p] or {}
            return d.get(key, 0)
        return get

    figs = {
        "funnel": _funnel_plot(runs),
        "rejects": _bars(runs, "rejects by stage/reason",
                         sorted({k for r in runs for k in r.stats["rejects"]}) or ["(none)"],
                         stat("rejects"), "rows", horizontal=True),
        "pose_clips": _bars(runs, "clips by dominant EFHQ pose bucket", list(BUCKETS),
                            stat("pose", "clips_by_bucket"), "clips"),
        "pose_frames": _bars(runs, "sampled face frames by EFHQ pose bucket", list(BUCKETS),
                             stat("pose", "frames_by_bucket"), "frames"),
        "yaw": _hists(runs, "yaw", "yaw over face frames", "yaw, degrees (+ = toward image right)", YAW_EDGES),
        "pitch": _hists(runs, "pitch", "pitch over face frames", "pitch, degrees (+ = up)", PITCH_EDGES),
        "yaw_range": _hists(runs, "yaw_range", "yaw range per clip", "yaw max - min, degrees", YAW_RANGE_EDGES),
        "duration": _hists(runs, "duration_s", "clip duration", "seconds"),
        "clips_per_video": _hists(runs, "clips_per_video", "kept clips per finished video", "clips",
                                  np.arange(-0.5, max([r.values["clips_per_video"].max(initial=0) for r in runs])
                                            + 1.5, 1.0)),
        "face_area": _hists(runs, "face_area_median", "face size (median box area / frame area)", "area ratio",
                            log=True),
        "blur": _hists(runs, "blur_median", "face sharpness (median Laplacian variance)", "variance", log=True),
        "speaking": _bars(runs, "clips by speaking label",
                          sorted({k for r in runs for k in r.stats["speech"]["labels"]}) or ["(none)"],
                          stat("speech", "labels"), "clips"),
        "av_sync": _sync(runs),
        "speech_ratio": _hists(runs, "speech_ratio", "speech ratio per clip", "share of the clip with speech",
                               np.linspace(0, 1, 21)),
    }
    for key, title, xlabel in QUALITY_PLOTS:
        if any(r.stats["quality"][key] for r in runs):
            figs[key] = _hists(runs, key, title, xlabel, log=key.startswith("motion"))
    figs.update(_sweep_plots(runs))
    if any(r.stats["identity"] for r in runs):
        sizes = sorted({int(k) for r in runs for k in (r.stats["identity"] or {}).get("identities_by_size", {})})
        figs["identities"] = _bars(runs, "identity clusters by size (clips per identity)",
                                   [str(s) for s in sizes],
                                   lambda run, k: (run.stats["identity"] or {}).get("identities_by_size", {})
                                   .get(k, 0), "identities")
    return figs


def _sweep_plots(runs: list[Run]) -> dict[str, bytes]:
    """One small plot per threshold: clips kept at each value, the recipe's value marked."""
    figs = {}
    keys = dict.fromkeys((s["stage"], s["param"]) for r in runs for s in r.stats["sweeps"])
    for stage, param in keys:
        fig, ax = _figure(3.4, 2.4)
        for k, run in enumerate(runs):
            for s in run.stats["sweeps"]:
                if (s["stage"], s["param"]) == (stage, param):
                    ax.plot(s["values"], s["kept"], "o-", color=COLOURS[k % 4], label=run.label, markersize=3)
                    ax.axvline(s["current"], color=COLOURS[k % 4], linestyle=":", linewidth=1)
        ax.set_title(f"{stage}.{param}", fontsize=9)
        ax.set_xlabel("threshold (dotted: the recipe's)", fontsize=8)
        ax.set_ylabel("clips kept", fontsize=8)
        ax.set_ylim(bottom=0)
        if len(runs) > 1:
            ax.legend(fontsize=6)
        figs[f"sweep-{stage}.{param}"] = _save(fig)
    return figs

