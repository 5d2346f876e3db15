"""Identity embedding throughput per core, beside face detection on the same frames.

Runs Face Constraints (decode + mediapipe detection + mesh) on real footage, then
embeds the faces it found with each backend at several batch sizes. Rates are
faces per CPU-second of this process (= per core) and per wall-second, with
native thread pools pinned to one thread.

ArcFace needs weights lafid cannot download: pass --arcface-dir with an
insightface models folder to time the real model. Without it the script times
an IResNet-50 with random weights, built here with onnx.helper: the same
layers and FLOPs as buffalo_l's w600k_r50, so the speed (not the accuracy) is
the real model's.

    python benchmarks/identity_throughput.py [--faces 64] [--batches 1 8 32] [--arcface-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import media  # noqa: E402
from lafid.face.embed import ArcFaceEncoder, DlibEncoder, IdentityEncoder  # noqa: E402
from lafid.item import Item  # noqa: E402
from lafid.stage import StageWorker, pin_native_threads  # noqa: E402
from lafid.video import content_id, probe  # noqa: E402
from stages.face_constraints import FaceConstraints  # noqa: E402


def iresnet50_onnx(path: Path, seed: int = 0) -> Path:
    """IResNet-50 (ArcFace's backbone: blocks 3-4-14-3, widths 64-512) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def param(shape):
        name = f"p{len(inits)}"
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.01).astype(np.float32), name))
        return name

    def conv(x, cin, cout, k, stride):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node("Conv", [x, param((cout, cin, k, k)), param((cout,))], [out],
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        return out

    def op(kind, *inputs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [out]))
        return out

    x = op("PRelu", conv("input.1", 3, 64, 3, 1), param((64, 1, 1)))
    cin = 64
    for blocks, width in zip((3, 4, 14, 3), (64, 128, 256, 512)):
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            y = op("PRelu", conv(x, cin, width, 3, 1), param((width, 1, 1)))
            y = conv(y, width, width, 3, stride)
            skip = conv(x, cin, width, 1, stride) if b == 0 else x
            x, cin = op("Add", y, skip), width
    x = op("Gemm", op("Flatten", x), param((512, 512 * 7 * 7)), param((512,)))
    nodes[-1].attribute.extend([helper.make_attribute("transB", 1)])
    graph = helper.make_graph(nodes, "iresnet50",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 512])], inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def detect(paths: list[str]) -> tuple[list[dict], float, float, int]:
    """Faces from Face Constraints on whole videos, with its wall and CPU seconds and frame count."""
    worker = StageWorker(FaceConstraints({"sample_fps": 5.0, "min_yaw_range": 0.0, "min_blur": 0.0}))
    items = []
    for p in paths:
        info = probe(p)
        items.append(Item(source=p, video_id=content_id(p), clip_index=0, start_s=0.0, end_s=info.duration_s))
    wall, cpu = time.perf_counter(), time.process_time()
    out, _ = worker.run(items)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    worker.close()
    frames = [f for item in out for f in item.work.get("frames", [])]
    return [face for f in frames for face in f["faces"]], wall, cpu, len(frames)


def rate(encoder: IdentityEncoder, faces: list[dict]) -> tuple[float, float, float]:
    """(faces per CPU-second, per wall-second, share of CPU time spent aligning)."""
    wall, cpu = time.perf_counter(), time.process_time()
    chips = [encoder.align(f["crop"], f["landmarks5"]) for f in faces]
    align_cpu = time.process_time() - cpu
    encoder.embed([c for c in chips if c is not None])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(faces) / cpu, len(faces) / wall, align_cpu / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=64, help="faces embedded per measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--arcface-dir", help="insightface models folder with antelopev2/ or buffalo_l/")
    args = ap.parse_args()
    pin_native_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        talk = media.carphone_frames()
        paths = [media.write_video(os.path.join(tmp, "carphone.mp4"), talk, 29.97),
                 media.write_video(os.path.join(tmp, "mirror.mp4"), media.mirror(talk), 29.97),
                 media.write_video(os.path.join(tmp, "hopper.mp4"), media.still(media.grace_hopper(), 2.0))]
        found, wall, cpu, n_frames = detect(paths)
        faces = [f for f in found if f["landmarks5"] is not None]
        faces = (faces * (args.faces // len(faces) + 1))[: args.faces]
        print(f"face constraints (decode+detect+mesh): {n_frames} frames, {len(found)} faces: "
              f"{len(found) / cpu:.1f} faces/s per core, {len(found) / wall:.1f} faces/s wall")

        arcface_dir = args.arcface_dir
        label = "arcface"
        if not arcface_dir:
            iresnet50_onnx(Path(tmp) / "models" / "buffalo_l" / "w600k_r50.onnx")
            arcface_dir, label = os.path.join(tmp, "models"), "arcface (IResNet-50 stand-in, random weights)"
        print(f"\n{'backend':<48} {'batch':>5} {'faces/s/core':>13} {'faces/s wall':>13} {'align share':>12}")
        for name, make in (("dlib", lambda b: DlibEncoder(batch_size=b)),
                           (label, lambda b: ArcFaceEncoder(arcface_dir, batch_size=b, threads=1))):
            for b in args.batches:
                encoder = make(b)
                encoder.embed([encoder.align(faces[0]["crop"], faces[0]["landmarks5"])])  # warm-up
                per_core, per_wall, align = rate(encoder, faces)
                print(f"{name:<48} {b:>5} {per_core:>13.1f} {per_wall:>13.1f} {align:>11.0%}")


if __name__ == "__main__":
    main()
