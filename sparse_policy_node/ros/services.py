"""Service calls that survive the first moments after discovery.

``Client.wait_for_service`` returns as soon as the graph shows the service, which can be
before DDS has matched this client's request writer with the server's request reader (or
the server's response writer with this client's reader). A request sent in that window is
dropped: requests are volatile, so a reader that matches later never sees it. On a loaded
machine the window can be long enough to lose a call. (A CI run lost a lifecycle
transition; that this window was the cause is a likely reading, not a proven one.)

:func:`call_service` therefore re-sends an unanswered request every ``resend_s``. That is
right for idempotent services (``~/reset`` at the start of an episode, ``get_parameters``).
For a service that must run once, send a request without effect first (a probe, re-sent
until answered) on the same client, then the real one with ``resend_s=None``.

Each call is recorded in :data:`CALL_LOG` (bounded): the service, the seconds spent
waiting for discovery and for the answer, the requests sent, and for a call that stalls
(not discovered within a second, re-sent, or unanswered) what the caller's ``diagnose``
saw at that moment. The test suite prints their distribution at the end of a run
(test/conftest.py), a measurement of lost requests.
"""

from collections import deque
from dataclasses import asdict
from dataclasses import dataclass
import threading
import time
from typing import Callable
from typing import Optional

# Newest calls of this process, oldest first; bounded so a long-running bridge stays flat.
CALL_LOG = deque(maxlen=10000)
STALL_S = 1.0  # a service not discovered within this long: diagnosed while it is missing


@dataclass
class CallRecord:
    """One :func:`call_service` call, as measured by the caller."""

    service: str
    discovery_s: float          # waiting for the graph to show the service
    answer_s: Optional[float]   # first send to the answer; None: not answered
    sends: int                  # requests sent (re-sends included); 0: not discovered
    answered_copy: Optional[int]  # which send the answer belongs to (1: the first)
    resend_s: Optional[float]   # None: a one-shot request
    timeout: float
    stall: Optional[dict] = None  # what ``diagnose`` saw when the call first stalled

    def note_stall(self, what: str, diagnose) -> None:
        """Record ``diagnose()`` once, at the call's first stall (``what``)."""
        if self.stall is not None:
            return
        self.stall = {'at': what}
        if diagnose is not None:
            try:
                self.stall.update(diagnose())
            except Exception as exc:  # noqa: B902 - a diagnosis never breaks the call
                self.stall['error'] = repr(exc)

    def as_dict(self) -> dict:
        """Return the record as a plain dict (for JSON)."""
        return asdict(self)


def call_service(client, request, timeout: float, resend_s: Optional[float] = 1.0,
                 discovery_timeout: Optional[float] = None,
                 diagnose: Optional[Callable[[], dict]] = None, matched: bool = False):
    """Call ``client``'s service; return the response, or None when none came in time.

    Args:
        client: an ``rclpy`` client whose node is spun by an executor on another thread.
        request: the request message.
        timeout: seconds to wait for the response, after the service was discovered.
        resend_s: re-send the request when it has been unanswered this long; None sends
            it once.
        discovery_timeout: seconds to wait for the service to appear (default ``timeout``);
            a re-sent request waits at most a second for it, then is sent anyway and re-sent
            until answered within this long (rmw can judge a present service missing).
        diagnose: returns a dict of what can be seen of the service (its graph, say);
            called once when the call stalls, stored in the call's :class:`CallRecord`.
        matched: the service answered a request of this client already (a probe): both
            directions are matched, so the request is sent without asking the graph.
    """
    record = CallRecord(str(getattr(client, 'srv_name', '?')), 0.0, None, 0, None, resend_s,
                        timeout)
    CALL_LOG.append(record)
    wait = timeout if discovery_timeout is None else discovery_timeout
    start = time.monotonic()
    discovered = matched or client.wait_for_service(timeout_sec=min(wait, STALL_S))
    if not discovered and wait > STALL_S:
        record.note_stall('discovery', diagnose)
        if resend_s is None:
            discovered = client.wait_for_service(timeout_sec=wait - (time.monotonic() - start))
        else:
            # rmw_fastrtps calls a service available only when the graph's request readers
            # and response writers pair up; an endpoint left by a half-removed participant
            # skews the count for as long as it lingers (a CI stall: 7 request readers, one
            # of an unknown node, against 6 response writers, while this client's server was
            # there). An idempotent request is therefore sent anyway and re-sent until
            # answered: a copy that no reader matched is lost, a matched one is answered.
            timeout = max(0.0, wait - (time.monotonic() - start))
            discovered = True
    record.discovery_s = time.monotonic() - start
    if not discovered:
        record.note_stall('discovery', diagnose)
        return None
    start = time.monotonic()
    deadline = start + timeout
    answered = threading.Event()
    futures = []
    while True:
        futures.append(client.call_async(request))
        futures[-1].add_done_callback(lambda _: answered.set())
        record.sends = len(futures)
        now = time.monotonic()
        until = deadline if resend_s is None else min(deadline, now + resend_s)
        if answered.wait(max(0.0, until - now)):
            record.answer_s = time.monotonic() - start
            # The first answer wins; a late answer to an earlier copy is the same answer.
            copy = next(i for i, f in enumerate(futures) if f.done())
            record.answered_copy = copy + 1
            return futures[copy].result()
        record.note_stall('answer', diagnose)
        if time.monotonic() >= deadline:
            return None
