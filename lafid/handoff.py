"""The working data Face Constraints hands to later stages in `item.work["frames"]`.

One dict per sampled frame: `t` (seconds from clip start), `faces` (one dict per
detected face: `box` normalised x0,y0,x1,y1, `score`, `area`, `blur`, `yaw`,
`pitch`, `roll`, `mouth_open`, `crop`, `landmarks5`, `kps`) and `tracked` (index
of the clip's subject, chosen once by Face Constraints with `lafid.face.track`,
or None). Later stages read the subject from here (`lafid.face.track.subject`)
and never change it; Identity Consistency only verifies it. `crop` is a square RGB crop of FACE_CROP_SIZE pixels
whose side is FACE_CROP_MARGIN times the box's long side, centred on the box;
`landmarks5` are in crop pixels. Stages never import each other, so both sides
of this hand-off read the geometry from here.
"""

FACE_CROP_SIZE = 224
FACE_CROP_MARGIN = 1.6
