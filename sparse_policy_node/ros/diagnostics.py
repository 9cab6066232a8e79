"""``/diagnostics`` content of the policy node: input freshness and inference health."""

from typing import Dict
from typing import Optional

from diagnostic_msgs.msg import DiagnosticArray
from diagnostic_msgs.msg import DiagnosticStatus
from sparse_policy_node.ros.conversions import make_status

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
# Counters of inputs the node could not use; their growth since the last message raises
# the inputs status to WARN (a burst of rejected inputs, a sync failure).
INPUT_PROBLEMS = ('rejected', 'dropped', 'future_stamps', 'sync_failures')


class Diagnostics:
    """Build the node's two statuses, ``<node>: inputs`` and ``<node>: inference``.

    Status names start with the node's fully qualified name (``/robot1/policy_node``), so a
    renamed or namespaced node is told apart; ``hardware_id`` names the host and device the
    model runs on. Levels:

    - inputs: WARN while an input is stale or missing (the staleness rule of
      :func:`~sparse_policy_node.ros.obs_history.input_age_s`), or when inputs were
      rejected, stamped in the future or failed to synchronize since the previous message;
    - inference: ERROR while the node's last error (failed model change, inference failure)
      stands, i.e. until the next good chunk; WARN while inputs are stale, the node is
      inactive or the safety layer holds the robot (enable off, watchdog); OK while serving.
    """

    def __init__(self, node_name: str, hardware_id: str):
        self.node_name, self.hardware_id = node_name, hardware_id
        self._previous: Dict[str, int] = {}

    def message(self, stats, ages: Dict[str, float], settings, runtime, active: bool = True,
                error: Optional[str] = None, holding: Optional[str] = None
                ) -> DiagnosticArray:
        """Return an unstamped DiagnosticArray.

        Args:
            stats: the node's :class:`~sparse_policy_node.ros.stats.RunStats`.
            ages: seconds per model observation key (model order), inf when never seen.
            settings: the node's :class:`~sparse_policy_node.ros.params.NodeSettings`.
            runtime: the engine's :class:`~sparse_policy_node.core.config.RuntimeConfig`.
            active: whether the node is in the lifecycle's active state (publishing chunks).
            error: the node's standing error, None when the last chunk went out fine.
            holding: why the safety layer holds the robot, None when it commands.
        """
        snap = stats.snapshot()
        stale = [k for k, a in ages.items() if a > settings.max_obs_age_s]
        counters = {k: v for k, v in snap.items() if k.startswith(INPUT_PROBLEMS)}
        new = {k: v - self._previous.get(k, 0) for k, v in counters.items()
               if v > self._previous.get(k, 0)}
        self._previous = counters
        problems = []
        if stale:
            problems.append(f'stale or missing: {", ".join(stale)}')
        if new:
            problems.append('since last report: ' + ', '.join(f'{n} {k}'
                                                              for k, n in sorted(new.items())))
        inputs = self._status('inputs', WARN if problems else OK,
                              '; '.join(problems) or 'all inputs fresh',
                              dict({f'age_s.{k}': a for k, a in ages.items()}, **counters))
        values = {k: v for k, v in snap.items() if k not in counters}
        values.update(active=active, sparsity_enabled=runtime.sparsity_enabled,
                      target_sparsity=runtime.target_sparsity,
                      steps=runtime.num_inference_steps, device=settings.device,
                      output_mode=getattr(settings, 'output_mode', 'chunk'),
                      holding=holding or '')
        if error:
            level, message = ERROR, error
        elif not active:
            level, message = WARN, 'inactive: no chunks'
        elif holding:
            level, message = WARN, f'holding: {holding}'
        elif stale:
            level, message = WARN, 'no new chunks: inputs stale'
        else:
            level, message = OK, 'serving'
        inference = self._status('inference', level, message, values)
        return DiagnosticArray(status=[inputs, inference])

    def _status(self, part, level, message, values) -> DiagnosticStatus:
        return make_status(f'{self.node_name}: {part}', level, message, values,
                           hardware_id=self.hardware_id)
