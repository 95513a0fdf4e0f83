"""Bouncer: an on-device guard runtime for AI inspection cameras."""

import os

__version__ = "0.1.0"

# OpenCV reads an image's size from its header and refuses more pixels than this before it allocates, so a
# 400 KB PNG that claims 20000 x 20000 costs nothing (runtime/images.py MAX_PIXELS). It must be set before cv2
# is first imported, which every import of a bouncer module comes after.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "64000000")
