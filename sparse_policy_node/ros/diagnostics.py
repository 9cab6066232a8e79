"""``/diagnostics`` content of the policy node: input freshness and inference health."""

from diagnostic_msgs.msg import DiagnosticArray
from diagnostic_msgs.msg import DiagnosticStatus
from sparse_policy_node.ros.conversions import make_status


def diagnostics_message(stats, keys, settings, runtime, active: bool = True) -> DiagnosticArray:
    """Build the two statuses ``policy_node: inputs`` and ``policy_node: inference``.

    Args:
        stats: the node's :class:`~sparse_policy_node.ros.stats.RunStats`.
        keys: model observation keys, in model order.
        settings: the node's :class:`~sparse_policy_node.ros.params.NodeSettings`.
        runtime: the engine's :class:`~sparse_policy_node.core.config.RuntimeConfig`.
        active: whether the node is in the lifecycle's active state (publishing chunks).

    Returns:
        an unstamped DiagnosticArray.
    """
    snap = stats.snapshot()
    ages = stats.obs_ages(keys)
    stale = [k for k, a in ages.items() if a > settings.max_obs_age_s]
    counters = {k: v for k, v in snap.items() if k.startswith(('dropped', 'rejected'))}
    inputs = make_status(
        'policy_node: inputs', DiagnosticStatus.WARN if stale else DiagnosticStatus.OK,
        f'stale or missing: {", ".join(stale)}' if stale else 'all inputs fresh',
        dict({f'age_s.{k}': a for k, a in ages.items()}, **counters))
    values = {k: v for k, v in snap.items() if k not in counters}
    values.update(active=active, sparsity_enabled=runtime.sparsity_enabled,
                  target_sparsity=runtime.target_sparsity,
                  steps=runtime.num_inference_steps, device=settings.device)
    level = DiagnosticStatus.ERROR if snap.get('model_load_failures') else (
        DiagnosticStatus.WARN if stale or not active else DiagnosticStatus.OK)
    message = ('inactive: no chunks' if not active else
               'no new chunks: inputs stale' if stale else 'serving')
    inference = make_status('policy_node: inference', level, message, values)
    return DiagnosticArray(status=[inputs, inference])
