"""The spool: the files a worker writes events to when Redis cannot take them.

`format` holds the bytes of a spool file (pure functions), `file` everything else for
now. This package names what the writer, the worker and the tests use.
"""

from .file import ALWAYS, BATCH, FSYNC_MODES, NEVER, Chunk, Spool, SpoolFile, find_orphan
from .format import FRAME_SIZE, FRAMING, HEADER_SIZE, encode_frame, encode_header, parse_frames

__all__ = ["ALWAYS", "BATCH", "FSYNC_MODES", "NEVER", "Chunk", "Spool", "SpoolFile", "find_orphan",
           "FRAME_SIZE", "FRAMING", "HEADER_SIZE", "encode_frame", "encode_header", "parse_frames"]
