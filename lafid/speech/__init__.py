"""Speech Disambiguation building blocks: audio, VAD, ASR, lip activity, sync, captions.

Each module is usable on its own (the benchmark times them one by one); the
stage in `stages/speech_disambiguation.py` wires them together per clip.
"""
