"""The shipped model directory: its pruners, their schedules and hashes, its serving default."""

import os

from conftest import make_obs
import pytest
from sparse_policy_node.core.checkpoint import load_pruners
from sparse_policy_node.core.checkpoint import read_serving_config
from sparse_policy_node.core.checkpoint import trained_max_age
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.engine import load_engine
import torch

LIFT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'models',
                    'lift')


def test_lift_has_a_pruner_per_schedule_trained_for_its_weights():
    pruners = load_pruners(LIFT)  # raises on a policy-hash mismatch
    assert set(pruners) == {('ddpm', 100), ('ddim', 10), ('ddim', 5)}
    assert trained_max_age(pruners[('ddim', 10)]) == 3
    assert trained_max_age(pruners[('ddim', 5)]) == 3
    assert trained_max_age(pruners[('ddpm', 100)]) == 0


def test_lift_serving_default_loads_and_runs_a_finite_chunk():
    serving = read_serving_config(LIFT)
    assert serving is not None, 'models/lift ships a serving default (sparse-policy frontier)'
    runtime = RuntimeConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in serving['runtime'].items()})
    engine = load_engine(LIFT)
    try:
        assert engine.runtime == runtime
        obs = make_obs(engine.policy)
        for _ in range(2):  # the first chunk is dense by rule, the second one gated
            out = engine.predict_action(obs, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out['action']).all()
        assert out['stats']['num_steps'] == runtime.num_inference_steps
        # The shipped default is learned gates on DDIM-5: the second chunk is gated.
        assert runtime.sparsity_enabled and runtime.gate_source == 'pruner'
        assert out['stats']['realized_sparsity'] > 0.0
        # The DDPM-100 pruner must not be used at DDIM-16: no pruner for that schedule.
        with pytest.raises(ConfigError, match='no pruner trained for ddim-16'):
            engine.set_runtime(RuntimeConfig(sampler='ddim', num_inference_steps=16))
    finally:
        engine.close()


CAN = os.path.join(os.path.dirname(LIFT), 'can')


def test_can_is_a_state_only_model_with_ddim10_and_ddpm100_pruners_for_its_weights():
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.model_card import read_card
    policy = load_policy(CAN)
    assert policy.config.obs.vision.cameras == ()
    assert [k for k, _ in policy.config.obs.lowdim][-1] == 'object'
    card = read_card(CAN, policy.config)
    assert card['cameras'] == {} and card['inputs']['object']['dim'] == 14
    pruners = load_pruners(CAN)  # raises on a policy-hash mismatch
    assert set(pruners) == {('ddim', 10), ('ddpm', 100)}
    assert trained_max_age(pruners[('ddim', 10)]) == 3
    # The DDPM-100 pruner is the one of the 0.93 ablation (docs/ablation.md).
    assert trained_max_age(pruners[('ddpm', 100)]) == 3
    assert pruners[('ddpm', 100)].metadata['target_sparsity'] == MATCHED_SPARSITY


def test_can_serving_default_runs_finite_chunks_from_state_alone():
    engine = load_engine(CAN)
    try:
        obs = make_obs(engine.policy)
        assert not any(key.endswith('_image') for key in obs)
        for _ in range(2):
            out = engine.predict_action(obs, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out['action']).all()
        assert out['action'].shape[-1] == 7
    finally:
        engine.close()
