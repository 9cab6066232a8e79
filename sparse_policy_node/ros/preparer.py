"""Structural changes prepared off the control path (pure Python, no rclpy).

A new model directory or device, or a backend whose graphs are not built yet (onnxruntime,
tensorrt: export and load), takes seconds. Done in the inference worker, no chunk would go
out meanwhile. :class:`EnginePreparer` builds the new engine in a thread of its own while
the worker keeps serving the running one; the worker swaps the built engine in between two
chunks, together with its model card (ros/worker.py ``_swap_prepared``).

One build at a time. A build that is no longer wanted when it finishes (the parameters
changed again meanwhile, or the node was cleaned up) is closed and dropped by the worker.
"""

from dataclasses import dataclass
import threading
import time
from typing import Callable
from typing import Optional


@dataclass
class Prepared:
    """The outcome of one build.

    Attributes:
        target: what was asked for (the worker compares it with what is wanted now).
        value: what ``build`` returned (engine and card), None when it failed.
        error: the exception ``build`` raised, else None.
        seconds: wall time of the build.
    """

    target: tuple
    value: object = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


class EnginePreparer:
    """Run one slow ``build`` at a time in a daemon thread; hand its outcome over once."""

    def __init__(self, discard: Callable[[object], None]):
        """``discard(value)`` frees a build nobody will take (after :meth:`cancel`)."""
        self._discard = discard
        self._lock = threading.Lock()
        self._target = None      # what is being built, None when idle
        self._done: Optional[Prepared] = None
        self._cancelled = False

    @property
    def target(self) -> Optional[tuple]:
        """What is being built or waits to be taken, None when neither."""
        with self._lock:
            if self._target is not None:
                return self._target
            return None if self._done is None else self._done.target

    def busy(self) -> bool:
        """Return True while a build runs or its outcome has not been taken."""
        return self.target is not None

    def start(self, target: tuple, build: Callable[[], object]) -> None:
        """Build ``target`` with ``build()`` in a new thread; refused while busy."""
        with self._lock:
            if self._target is not None or self._done is not None:
                raise RuntimeError(f'already preparing {self._target or self._done.target}')
            self._target = target
        threading.Thread(target=self._run, args=(target, build), name='engine_preparer',
                         daemon=True).start()

    def take(self) -> Optional[Prepared]:
        """Return the finished build once (then the preparer is idle), else None."""
        with self._lock:
            done, self._done = self._done, None
        return done

    def cancel(self) -> None:
        """Drop the finished build and any running one (its value is discarded when done)."""
        with self._lock:
            self._cancelled = True
            done, self._done = self._done, None
        if done is not None and done.value is not None:
            self._discard(done.value)

    def _run(self, target: tuple, build: Callable[[], object]) -> None:
        t0 = time.monotonic()
        try:
            done = Prepared(target, value=build())
        except Exception as exc:  # noqa: B902 - any failure is handed to the worker
            done = Prepared(target, error=exc)
        done.seconds = time.monotonic() - t0
        with self._lock:
            self._target = None
            cancelled = self._cancelled
            if not cancelled:
                self._done = done
        if cancelled and done.value is not None:
            self._discard(done.value)
