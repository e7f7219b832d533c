"""The reload roll: the config read again, checked, and carried to the running workers.

Owns: the reload plan (config.reload_plan: hot keys, keys that need new workers, the
worker count), the hot settings sent to the workers and their acknowledgements, the
rolling replacement (a new worker boots in a free slot, and only once it serves is the old
one retired, one at a time), the hand-over of listening sockets between the two, the
rollback to the previous config when the new one cannot run, and the reply to whoever
asked (HUP or `meteoritctl reload`), now or once the roll is over.
Must not touch: forking and reaping (slots.py does them when asked), systemd (the master's
`reload_began` / `reload_ended` hooks), the control socket (replies go through `respond`).

If a new worker cannot start, the old ones keep serving and the previous config is
restored; workers already on the new one are replaced back by the same rolling steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import msgpack

from .. import config as configlib
from ..bus.waiters import Waiter
from ..bus.ipc import Bus
from ..config import Config
from ..errors import ConfigError, IpcError, MeteoritError
from ..worker.process import CONFIG_ALERT
from .listeners import Listeners
from .slots import Slots, WorkerProcess

log = logging.getLogger("meteorit.master")

HOT_APPLY_TIMEOUT = 5.0  # seconds workers have to acknowledge hot settings
LISTEN_KEYS = ("server.listen",)

Respond = Callable[[dict[str, Any]], None]


@dataclass
class Roll:
    """One step of a rolling replacement: `new_slot` boots while `old_slot` still serves."""
    old_slot: int
    new_slot: int


@dataclass
class ReloadState:
    """A reload in progress: what to restore if the new workers cannot start."""
    previous: Config
    plan: configlib.ReloadPlan
    waiting: list[Respond] = field(default_factory=list)
    previous_redis_url: str = ""
    previous_count: int = 0
    hot_waiter: Waiter | None = None
    hot_alert: int = 0
    hot_deadline: float = 0.0


class Owner(Protocol):
    """What a reload reads of the master, and tells it."""
    config: Config
    redis_url: str
    stopping: bool
    bus: Bus | None

    def adopt(self, config: Config, redis_url: str) -> None:
        """Run `config` from now on (new workers get it, and `redis_url`)."""

    def reload_began(self) -> None:
        """For systemd: RELOADING=1."""

    def reload_ended(self, ok: bool) -> None:
        """For systemd: READY=1 again, with the outcome."""


class Reload:
    def __init__(self, owner: Owner, slots: Slots, listeners: Listeners) -> None:
        self.owner = owner
        self.slots = slots
        self.listeners = listeners
        self.state: ReloadState | None = None
        self.roll: Roll | None = None
        self.reloads = 0  # applied
        self.failures = 0  # refused or rolled back

    @property
    def in_progress(self) -> bool:
        return self.state is not None

    def busy_slots(self) -> set[int]:
        """Slots a scale down must leave alone: the one a roll is replacing."""
        return {self.roll.old_slot} if self.roll is not None else set()

    def hot_deadline(self) -> float | None:
        """When the wait for hot acknowledgements ends, if one runs."""
        state = self.state
        return state.hot_deadline if state is not None and state.hot_waiter is not None else None

    # --- the plan

    def start(self, respond: Respond) -> None:
        """Read the config again and apply it; `respond` gets the outcome (now or later)."""
        owner = self.owner
        if self.state is not None:
            log.warning("reload refused: a reload is already in progress")
            respond({"ok": False, "error": "a reload is already in progress"})
            return
        owner.reload_began()  # every outcome below ends in reload_ended
        try:
            new = configlib.reload(owner.config)
            plan = configlib.reload_plan(owner.config, new)
            if plan.replace and any(key in LISTEN_KEYS for key in plan.replace) and not self.listeners.activated:
                self.listeners.bind(new.server.listen)
        except (ConfigError, MeteoritError, OSError) as exc:
            self.failures += 1
            key, reason = (exc.key, exc.reason) if isinstance(exc, ConfigError) else ("server.listen", str(exc))
            log.error("reload refused, the running config stays: %s: %s", key, reason)
            owner.reload_ended(False)
            respond({"ok": False, "error": f"{key}: {reason}", "key": key, "version": owner.config.version})
            return
        if not plan.changed:
            owner.reload_ended(True)
            respond(self._reply(plan))
            return
        self.state = ReloadState(previous=owner.config, plan=plan, waiting=[respond],
                                 previous_redis_url=owner.redis_url, previous_count=self.slots.target)
        owner.adopt(new, owner.redis_url if new.embedded_redis else new.redis.url)
        logging.getLogger().setLevel(new.log.level.upper())
        log.info("reloading", extra={"config_version": new.version, "changed": plan.changed,
                                     "mode": plan.mode})
        if not plan.replace:  # hot keys, or only the worker count: the workers stay
            self._apply_hot(new)
        if "server.workers" in plan.changed:  # else a count set by scale or TTIN/TTOU stays
            error = self.slots.scale(new.worker_count, keep=self.busy_slots())
            if error:
                log.error("reload: %s", error)
        self.maybe_finish()

    def _reply(self, plan: configlib.ReloadPlan) -> dict[str, Any]:
        return {"ok": True, "version": self.owner.config.version, "mode": plan.mode, "changed": plan.changed,
                "workers_by_version": dict(self.slots.versions())}

    # --- hot settings

    def _apply_hot(self, new: Config) -> None:
        """Hot settings go to the running workers; each applies them and acknowledges."""
        bus = self.owner.bus
        assert bus is not None and self.state is not None
        try:
            alert_id = bus.broadcast(CONFIG_ALERT, msgpack.packb(new.values))
        except IpcError as exc:
            log.error("reload: hot settings not sent (%s); the workers will be replaced", exc)
            return
        self.state.hot_waiter = bus.expect(alert_id, set(bus.worker_pids))
        self.state.hot_deadline = time.monotonic() + HOT_APPLY_TIMEOUT
        self.state.hot_alert = alert_id

    def _check_hot_acks(self) -> None:
        state = self.state
        if state is None or state.hot_waiter is None:
            return
        waiter = state.hot_waiter
        for pid, version in waiter.replies.items():
            self.slots.set_version(pid, version.decode(errors="replace"))
        if waiter.complete or time.monotonic() > state.hot_deadline:
            assert self.owner.bus is not None
            self.owner.bus.forget_waiter(state.hot_alert)
            if waiter.missing:
                log.warning("reload: workers %s did not acknowledge in time; they will be replaced",
                            waiter.missing)
            state.hot_waiter = None

    # --- the rolling replacement, one step per turn of the master's loop

    def step(self) -> None:
        self._check_hot_acks()
        if self.state is not None and self.state.hot_waiter is not None:
            return  # acknowledgements first: only workers that did not take them get replaced
        roll = self.roll
        if roll is not None:
            new = self.slots.workers.get(roll.new_slot)
            if new is not None and new.ready:
                self.slots.replace(roll.old_slot, roll.new_slot)
                self.roll = None
                log.info("worker replaced", extra={"old_slot": roll.old_slot, "slot": roll.new_slot})
            return  # a replacement that never serves is killed as a wedged boot: its exit aborts the roll
        stale = [w for w in self.slots.stale(self.owner.config.version) if w.ready]
        if not stale:
            self.maybe_finish()
            return
        slot = self.slots.free_slot()
        if slot is None:
            self._abort("no free slot for a replacement worker (raise server.max_workers)")
            return
        self.roll = Roll(old_slot=stale[0].slot, new_slot=slot)
        self.listeners.hand_over(stale[0].slot, slot)
        try:
            self.slots.spawn(slot)
        except MeteoritError as exc:
            self.roll = None
            self._abort(f"cannot start a new worker: {exc}")

    # --- workers that died on the new config

    def replacement_died(self, worker: WorkerProcess, how: str) -> bool:
        """If `worker` was the replacement being booted, the roll is given up; True then."""
        if self.roll is None or worker.slot != self.roll.new_slot:
            return False
        log.error("replacement worker %s before it served; keeping the old workers", how,
                  extra={"slot": worker.slot, "worker_pid": worker.pid})
        self.listeners.close_slot(worker.slot)
        self._abort(f"a new worker {how} before it served (see its log)")
        return True

    def roll_back_for(self, worker: WorkerProcess, how: str) -> bool:
        """`worker` failed to boot: if on the config being reloaded, that config goes and
        True (its slot is respawned on the previous one); else False, nothing changed."""
        if self.state is None or worker.version != self.owner.config.version:
            return False
        log.error("a worker on the reloaded config failed to boot; rolling back",
                  extra={"slot": worker.slot, "worker_pid": worker.pid})
        self._abort(f"a new worker {how} before it served (see its log)")
        return True

    def _abort(self, reason: str) -> None:
        """The new config cannot run: the previous one comes back (workers already on the new
        one are replaced back by the same rolling steps)."""
        self.roll = None
        state = self.state
        if state is None:
            log.error("rolling replacement stopped: %s", reason)
            return
        self.failures += 1
        self.owner.adopt(state.previous, state.previous_redis_url)
        previous_listen = state.previous.server.listen
        if self.listeners.configured and self.listeners.configured != previous_listen and not self.listeners.activated:
            try:
                self.listeners.bind(previous_listen)
            except MeteoritError as exc:
                log.error("rollback: cannot listen on the previous addresses again: %s", exc)
        if self.slots.target != state.previous_count:
            self.slots.scale(state.previous_count, keep=self.busy_slots())
        logging.getLogger().setLevel(state.previous.log.level.upper())
        self._finish({"ok": False, "error": f"reload rolled back: {reason}", "version": state.previous.version})

    # --- the end

    def maybe_finish(self) -> None:
        state = self.state
        if (state is None or state.hot_waiter is not None or self.roll is not None
                or self.slots.stale(self.owner.config.version)):
            return
        if self.slots.booting():
            return  # scaling up: the new ones are still booting
        self.reloads += 1
        self._finish(self._reply(state.plan))

    def cancel(self, error: str) -> None:
        """A reload in progress ends unapplied, its callers told `error` (the master stops)."""
        self._finish({"ok": False, "error": error})

    def _finish(self, reply: dict[str, Any]) -> None:
        state, self.state = self.state, None
        if state is None:
            return
        if state.hot_waiter is not None and self.owner.bus is not None:
            self.owner.bus.forget_waiter(state.hot_alert)
        log.info("reload done" if reply.get("ok") else "reload failed", extra={
            "config_version": self.owner.config.version, "error": reply.get("error")})
        if not self.owner.stopping:  # no READY=1 after STOPPING=1
            self.owner.reload_ended(bool(reply.get("ok")))
        for respond in state.waiting:
            respond(reply)
