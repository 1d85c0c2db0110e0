"""Preemption: SIGTERM -> finish the current step, save, wait for the save, exit 0.

One process: a Python SIGTERM handler sets a flag the loop reads at every step boundary.
Several processes: jax.distributed's preemption service (started by `jax.distributed.initialize`)
catches SIGTERM on any host and all processes agree on a sync step; orbax's
`CheckpointManager.reached_preemption(step)` returns True on every process at that same step,
so they all save the same step together. We then do not install our own handler (it would
replace the service's).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

_log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Tells the loop when to stop for a preemption.

    Usage:
        watcher = PreemptionWatcher(checkpointer)   # installs the handler (one process)
        ...
        if watcher.should_stop(step): save; wait; return
        watcher.restore()                            # previous SIGTERM handler back
    """

    def __init__(self, checkpointer=None):
        self._checkpointer = checkpointer
        self._event = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        del frame
        _log.warning("received signal %d: saving at the next step boundary, then exiting", signum)
        self._event.set()

    def request_stop(self) -> None:
        """Asks the loop to stop as if a SIGTERM arrived (tests, notebooks)."""
        self._event.set()

    @property
    def requested(self) -> bool:
        """True once a stop was requested on this process."""
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        """True when the loop must save and exit after `step` (all processes agree)."""
        if self._multi:
            return self._checkpointer is not None and self._checkpointer.reached_preemption(step)
        return self._event.is_set()

    def restore(self) -> None:
        """Reinstalls the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
