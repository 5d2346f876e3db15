"""The face toolkit every face user shares: the stages, CoFE's identity expert, the benchmarks.

`detect` finds faces (mediapipe detection + mesh, or insightface SCRFD) and owns the
face geometry (`Face`, IoU, square crops, blur); `pose` measures head pose, mouth
opening and the 5 ArcFace landmarks from the mesh; `track` is the clip's one
subject track (chosen by Face Constraints, verified by Identity Consistency);
`embed` turns aligned faces into identity embeddings (ArcFace, dlib).
"""
