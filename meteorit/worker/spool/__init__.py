"""The spool: the files a worker writes events to when Redis cannot take them.

Three modules, by concern: `format` (the bytes of a spool file, pure functions), `file`
(one spool file on disk: locks, appends, reads, the cursor, compaction, orphans) and
`policy` (a worker's spool: group commit, the fsync mode, the room it may take). This
package names what the writer, the worker and the tests use.
"""

from .file import ALWAYS, BATCH, FSYNC_MODES, NEVER, Chunk, SpoolFile, find_orphan
from .format import FRAME_SIZE, FRAMING, HEADER_SIZE, encode_frame, encode_header, parse_frames
from .policy import Spool

__all__ = ["ALWAYS", "BATCH", "FSYNC_MODES", "NEVER", "Chunk", "Spool", "SpoolFile", "find_orphan",
           "FRAME_SIZE", "FRAMING", "HEADER_SIZE", "encode_frame", "encode_header", "parse_frames"]
