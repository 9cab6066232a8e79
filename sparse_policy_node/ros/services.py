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
"""

import threading
import time
from typing import Optional


def call_service(client, request, timeout: float, resend_s: Optional[float] = 1.0,
                 discovery_timeout: Optional[float] = None):
    """Call ``client``'s service; return the response, or None when none came in time.

    Args:
        client: an ``rclpy`` client whose node is spun by an executor on another thread.
        request: the request message.
        timeout: seconds to wait for the response, after the service was discovered.
        resend_s: re-send the request when it has been unanswered this long; None sends
            it once.
        discovery_timeout: seconds to wait for the service to appear (default ``timeout``).
    """
    wait = timeout if discovery_timeout is None else discovery_timeout
    if not client.wait_for_service(timeout_sec=wait):
        return None
    deadline = time.monotonic() + timeout
    answered = threading.Event()
    futures = []
    while True:
        futures.append(client.call_async(request))
        futures[-1].add_done_callback(lambda _: answered.set())
        now = time.monotonic()
        until = deadline if resend_s is None else min(deadline, now + resend_s)
        if answered.wait(max(0.0, until - now)):
            # The first answer wins; a late answer to an earlier copy is the same answer.
            return next(f.result() for f in futures if f.done())
        if time.monotonic() >= deadline:
            return None
