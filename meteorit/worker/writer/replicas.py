"""`redis.wait_replicas`: a group commit acknowledged only once N replicas have it.

Owns: reading WAIT's answers (enough replicas, or the error that sends a batch's events
to the spool too), the `replicas_short` state that holds replays back, and the probe that
asks, with a short WAIT on a connection with no write pending, whether replicas are back
when no write says so. Must not touch: the connection or the group commit (commit.py
sends the RPUSH and the WAIT together, on one connection: WAIT counts that connection's
writes).
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from .wire import TRANSPORT_ERRORS, pack_wait

log = logging.getLogger("meteorit.writer")

REPLICA_PROBE = 0.1  # seconds a WAIT asking whether replicas are back may take


class ReplicasShort(RedisError):
    """WAIT counted fewer replicas than `redis.wait_replicas` within its timeout."""


class ReplicaWait:
    """What RedisWriter does with WAIT's answers: a part of the writer, kept apart by
    concern. It uses the writer's `_command`, `check_spools` and `_went_down`."""

    timeout: float
    wait_replicas: int
    replicas_short: bool
    waits_short: int
    replaying: bool
    _command: Any
    check_spools: Any
    _went_down: Any

    def pack_wait(self, replicas: int) -> bytes:
        return pack_wait(replicas, self.timeout)

    def _saw_replicas(self, replicas: object, wanted: int) -> ReplicasShort | None:
        """The WAIT's answer: None when enough replicas have the write, else the error that
        sends its events to the spool too."""
        if isinstance(replicas, int) and replicas >= wanted:
            if self.replicas_short:
                self.replicas_short = False
                log.info("replicas keep up again (WAIT %d met)", wanted)
                self.check_spools()
            return None
        self.waits_short += 1
        if not self.replicas_short:
            self.replicas_short = True
            log.warning("WAIT %d: only %s replicas acknowledged within %.1fs; spooling those events too",
                        wanted, replicas, self.timeout)
        return ReplicasShort(f"{replicas} of {wanted} replicas acknowledged")

    async def _probe_replicas(self) -> None:
        """WAIT on a connection with no write pending answers how many replicas are linked."""
        try:
            replicas = await self._command(pack_wait(self.wait_replicas or 1, REPLICA_PROBE))
            if self.wait_replicas:
                self._saw_replicas(replicas, self.wait_replicas)
            else:
                self.replicas_short = False
        except TRANSPORT_ERRORS as exc:
            self._went_down(exc)
        except RedisError:
            pass
        finally:
            self.replaying = False
