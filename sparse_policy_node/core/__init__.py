"""Pure-torch core of sparse_policy_node: no rclpy, no message packages, no robosuite.

Shape alphabet used in every docstring and trailing comment of this package:

- ``B``   batch
- ``T_o`` observation steps fed to the policy (``n_obs_steps``)
- ``T_a`` action horizon predicted per chunk (``horizon``)
- ``T_c`` condition (memory) tokens, ``1 + T_o`` (time token + one token per observation step)
- ``D``   transformer width (``n_emb``)
- ``A``   action dimension
- ``D_o`` per-step observation feature size (image features + low-dim state)
- ``K``   denoising steps executed per chunk (number of inference steps)
- ``U``   prunable residual units, ``3 * n_layer`` (SA, CA, FFN per decoder layer)
- ``C``   gate choices, 4: compute, reuse-forward, reuse-timestep, reuse-rollout
- ``H``   pruner width
"""
