"""The cache folder's layout: what each name in it holds.

Layout::

    manifest.json          images (tag -> id, config, layer digests) and blobs
    blobs/<hex>.zst        one compressed layer tar per diff id, shared by every image
    .lock                  taken while a save or load runs

Every file is written to a temporary name, fsynced and renamed, and the manifest is
replaced last: an interrupted or failed save leaves the previous cache whole.
"""

from __future__ import annotations

FORMAT = "layerkeep-cache/2"
MANIFEST = "manifest.json"
BLOBS = "blobs"
LOCK = ".lock"
CHUNK = 1 << 20
