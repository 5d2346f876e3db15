"""Head pose and mouth measures now live in `lafid.face.pose`; this alias keeps old imports working."""

from lafid.face.pose import *  # noqa: F401,F403
from lafid.face.pose import BUCKET_PITCH, BUCKET_YAW, BUCKETS  # noqa: F401
