"""Guards for the rclpy API differences between Humble, Jazzy and Kilted.

The nodes use only API that exists in all three distributions, except for two conveniences
that are guarded here (checked against ros2/rclpy's history):

- ``rclpy.init()`` returns a context manager only since rclpy 7.4 (Kilted); on Humble and
  Jazzy it returns None, so ``with rclpy.init():`` fails there. :func:`ros_session` works on
  all of them.
- ``Node.add_post_set_parameters_callback`` exists since Iron (Jazzy, Kilted), not on Humble.
  :class:`ParameterWatch` uses it where it exists and otherwise compares the parameter
  values on each poll, so a change is still applied after it has been set.
- ``rclpy.try_shutdown`` is missing on Humble; :func:`ros_session` falls back to
  ``shutdown`` when the context is still up.
"""

from contextlib import contextmanager
from typing import Callable
from typing import Dict
from typing import Optional
from typing import Sequence

import rclpy


@contextmanager
def ros_session(args: Optional[Sequence[str]] = None, context=None):
    """Initialize rclpy for the block and shut it down after it (any distribution).

    Args:
        args: command-line arguments (``--ros-args ...``), as for ``rclpy.init``.
        context: the rclpy Context to use; None: the default context.
    """
    rclpy.init(args=args, context=context)  # a context manager on Kilted only: not used
    try:
        yield
    finally:
        try_shutdown = getattr(rclpy, 'try_shutdown', None)
        if try_shutdown is not None:
            try_shutdown(context=context)
        elif rclpy.ok(context=context):
            rclpy.shutdown(context=context)


class ParameterWatch:
    """Call ``on_change`` after parameters changed, on every supported rclpy.

    With a post-set callback (Iron and later) the callback fires after each successful set.
    Without one (Humble) :meth:`poll`, called by the node's worker loop, compares the
    current values of ``names`` with those of the previous poll; a validator (on-set)
    callback cannot be used for this because it runs before the new values are stored.
    """

    def __init__(self, node, names: Sequence[str], on_change: Callable[[], None]):
        self._node, self._names, self._on_change = node, tuple(names), on_change
        add = getattr(node, 'add_post_set_parameters_callback', None)
        self.native = add is not None
        if self.native:
            add(lambda _params: on_change())
        self._seen = self._values()

    def _values(self) -> Dict[str, object]:
        return {n: self._node.get_parameter(n).value for n in self._names}

    def poll(self) -> bool:
        """Fallback path: call ``on_change`` if a value changed since the last poll."""
        if self.native:
            return False
        values = self._values()
        changed, self._seen = values != self._seen, values
        if changed:
            self._on_change()
        return changed
