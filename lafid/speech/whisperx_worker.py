"""Runs whisperx inside its own environment; spoken to by `asr.WhisperXASR`.

Executed as a script by that environment's Python (whisperx pins torch 2.8,
which must not meet the main environment), so it imports nothing from lafid.
Reads 16 kHz float32 speech from a .npy file and prints one JSON line:
{"text", "language", "words": [{"word", "start", "end", "prob"}]}.
"""

import argparse
import json

import numpy as np
import torch
import whisperx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", required=True)
    ap.add_argument("--model", required=True, help="model name or local CTranslate2 directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--language")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    audio = np.load(args.audio)
    model = whisperx.load_model(args.model, args.device, compute_type=args.compute_type,
                                language=args.language, threads=args.threads)
    result = model.transcribe(audio, batch_size=args.batch_size)
    language = result["language"]
    align_model, align_meta = whisperx.load_align_model(language_code=language, device=args.device)
    aligned = whisperx.align(result["segments"], align_model, align_meta, audio, args.device)
    words = [
        {"word": w["word"], "start": w["start"], "end": w["end"], "prob": w.get("score", 0.0)}
        for w in aligned["word_segments"] if "start" in w  # numerals whisperx cannot align have no times
    ]
    text = " ".join(s["text"].strip() for s in result["segments"])
    print(json.dumps({"text": text, "language": language, "words": words}))


if __name__ == "__main__":
    main()
