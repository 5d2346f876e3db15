"""Identity across clips: `cluster` groups clips of the same person over a whole curate
output (`lafid identities`); `calibration` measures same/different-person distances on
real faces and picks the thresholds (benchmarks/identity_calibration.py). Embedding and
the within-clip subject track live in the face toolkit (`lafid.face.embed`, `lafid.face.track`).
"""
