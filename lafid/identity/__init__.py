"""Identity: face embeddings, within-clip identity tracks and cross-clip clusters.

`encoders` turns aligned faces into embeddings (ArcFace ONNX or dlib ResNet),
`track` follows one person through a clip's sampled frames and measures how
stable the identity is, `cluster` groups clips of the same person across a whole
curate output (`lafid identities`).
"""
