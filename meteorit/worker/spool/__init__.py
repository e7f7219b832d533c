"""The spool: the files a worker writes events to when Redis cannot take them.

Owns nothing itself: it names what the rest of the worker and the tests use.
"""

from .file import *  # noqa: F401,F403  (split by concern in the next commits)
