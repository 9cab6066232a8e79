"""Config dataclasses: presets, validation errors that name the field, JSON round trip."""

import json

import pytest
from sparse_policy_node.core.config import config_from_dict
from sparse_policy_node.core.config import config_to_dict
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import make_preset
from sparse_policy_node.core.config import PolicyConfig
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.config import SchedulerConfig
from sparse_policy_node.core.config import TransformerConfig


def test_paper_preset_matches_the_paper():
    cfg = make_preset('paper')
    t = cfg.transformer
    assert (t.n_layer, t.n_head, t.n_emb, t.horizon, t.n_obs_steps) == (8, 4, 256, 10, 2)
    assert cfg.n_action_steps == 8
    assert cfg.scheduler.sampler == 'ddpm' and cfg.scheduler.num_inference_steps == 100
    assert cfg.obs.obs_feature_dim == 2 * 64 + 9
    assert t.num_units == 24


@pytest.mark.parametrize('name', ['paper', 'small', 'tiny'])
def test_presets_round_trip_through_json(name):
    cfg = make_preset(name)
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(PolicyConfig, data) == cfg


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match='valid presets'):
        make_preset('huge')


@pytest.mark.parametrize('kwargs, field', [
    ({'n_emb': 30, 'n_head': 4}, 'n_emb'),
    ({'n_layer': 0}, 'n_layer'),
    ({'p_drop_attn': 1.5}, 'p_drop_attn'),
])
def test_transformer_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f'TransformerConfig.{field}'):
        TransformerConfig(**kwargs)


def test_scheduler_validation_names_the_field():
    with pytest.raises(ConfigError, match='SchedulerConfig.sampler'):
        SchedulerConfig(sampler='euler')
    with pytest.raises(ConfigError, match='num_inference_steps'):
        SchedulerConfig(num_inference_steps=500)


def test_action_steps_must_fit_the_horizon():
    with pytest.raises(ConfigError, match='n_action_steps'):
        PolicyConfig(n_action_steps=20)


@pytest.mark.parametrize('kwargs, field', [
    ({'target_sparsity': 1.0}, 'target_sparsity'),
    ({'target_sparsity': float('nan')}, 'target_sparsity'),
    ({'directions': ()}, 'directions'),
    ({'directions': ('sideways',)}, 'directions'),
    ({'directions': ('forward', 'forward')}, 'directions'),
    ({'gate_source': 'oracle'}, 'gate_source'),
    ({'sampler': 'euler'}, 'sampler'),
    ({'num_inference_steps': 0}, 'num_inference_steps'),
    ({'gate_source': 'static'}, 'target_sparsity'),
    ({'sparsity_enabled': 'yes'}, 'sparsity_enabled'),
])
def test_runtime_knob_validation_names_the_knob(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(**kwargs)


def test_from_dict_rejects_unknown_and_mistyped_fields():
    data = config_to_dict(make_preset('tiny'))
    data['transformer']['n_layers'] = 3
    with pytest.raises(ConfigError, match='n_layers'):
        config_from_dict(PolicyConfig, data)
    data = config_to_dict(make_preset('tiny'))
    data['transformer']['n_layer'] = 'eight'
    with pytest.raises(ConfigError, match='policy.transformer.n_layer'):
        config_from_dict(PolicyConfig, data, 'policy')
