"""ROS parameters mirror RuntimeConfig one to one; YAML files and validation agree."""

import os

import pytest
from rclpy.node import Node
from rclpy.parameter import Parameter
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.ros import params
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_runtime_field_has_one_documented_parameter():
    assert params.runtime_fields_covered()
    for p in params.RUNTIME_PARAMS + params.NODE_PARAMS + params.BRIDGE_PARAMS:
        d = p.descriptor()
        assert d.description.endswith('.'), p.name
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool) \
                and p.min_value is not None:
            assert d.integer_range or d.floating_point_range, p.name


def test_round_trip_through_node_parameters(context):
    cfg = RuntimeConfig(sparsity_enabled=False, gate_source='static', target_sparsity=0.7,
                        directions=('timestep', 'rollout'), sampler='ddim',
                        num_inference_steps=16, backend='onnxruntime')
    overrides = [Parameter(k, value=v) for k, v in params.runtime_to_params(cfg).items()]
    node = Node('round_trip', context=context, parameter_overrides=overrides)
    params.declare_policy_parameters(node)
    assert params.config_from_params(node) == cfg
    assert params.settings_from_params(node) == params.NodeSettings()
    d = node.describe_parameter('sparsity.target')
    assert d.floating_point_range[0].to_value == pytest.approx(0.99)
    node.destroy_node()


def test_validator_rejects_with_the_dataclass_reason(context):
    node = Node('validate', context=context)
    params.declare_policy_parameters(node)
    node.add_on_set_parameters_callback(params.make_validator(node))
    cases = {
        'sparsity.directions': (['sideways'], 'RuntimeConfig.directions'),
        'sampler.name': ('euler', 'RuntimeConfig.sampler'),
        'sparsity.gate_source': ('oracle', 'RuntimeConfig.gate_source'),
        'inference.backend': ('tvm', 'RuntimeConfig.backend'),
        'device': ('tpu', 'device must be'),
        'lowdim_map': (['broken'], None),       # read-only: rclpy refuses it
        'action.lower': ([2.0], 'below action.upper'),
        'sparsity.target': (1.5, None),         # out of the declared range
    }
    for name, (value, reason) in cases.items():
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful, name
        if reason:
            assert reason in result.reason, (name, result.reason)
    assert node.set_parameters([Parameter('sparsity.target', value=0.9)])[0].successful
    assert params.config_from_params(node).target_sparsity == 0.9
    node.destroy_node()


def test_cuda_device_rejected_when_unavailable():
    import torch
    if torch.cuda.is_available():
        pytest.skip('CUDA present')
    with pytest.raises(ValueError, match='CUDA is not available'):
        params.check_device('cuda:0')


@pytest.mark.parametrize('name, table, settings', [
    ('policy.yaml', params.RUNTIME_PARAMS + params.NODE_PARAMS, params.NodeSettings),
    ('sim_bridge.yaml', params.BRIDGE_PARAMS, params.BridgeSettings)])
def test_yaml_files_use_declared_names_and_valid_values(name, table, settings):
    with open(os.path.join(ROOT, 'config', name)) as f:
        data = yaml.safe_load(f)
    values = data['/**']['ros__parameters']
    declared = {p.name: p for p in table}
    if name == 'policy.yaml':
        # The runtime knobs are left to the model's serving default: each is documented as
        # a commented-out line with a valid value, ready to be pinned.
        with open(os.path.join(ROOT, 'config', name)) as f:
            commented = {}
            for line in f:
                key, sep, rest = line.strip().lstrip('#').strip().partition(':')
                if line.strip().startswith('#') and sep and key in declared:
                    commented[key] = yaml.safe_load(rest.split(' #')[0])
        runtime_names = {p.name for p in params.RUNTIME_PARAMS}
        assert set(commented) == runtime_names, set(commented) ^ runtime_names
        values = dict(values, **commented)
    assert set(values) == set(declared), set(values) ^ set(declared)
    for key, value in values.items():
        default = declared[key].default
        assert type(value) is type(default) or (isinstance(default, list)
                                                and isinstance(value, list)), key
    kwargs = {declared[k].attr: v for k, v in values.items()}
    runtime = {p.attr for p in params.RUNTIME_PARAMS}
    settings(**{k: v for k, v in kwargs.items() if k not in runtime})
    if table is not params.BRIDGE_PARAMS:
        RuntimeConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                         for k, v in kwargs.items() if k in runtime})


def test_real_arm_profile_uses_declared_names_and_valid_values():
    with open(os.path.join(ROOT, 'config', 'real_arm_example.yaml')) as f:
        values = yaml.safe_load(f)['/**']['ros__parameters']
    declared = {p.name: p for p in params.NODE_PARAMS}
    assert set(values) <= set(declared), set(values) - set(declared)
    settings = params.NodeSettings(**{declared[k].attr: v for k, v in values.items()})
    assert settings.output_mode == 'pose_target' and settings.safety_require_enable
    assert len(settings.output_joint_names) == 7


def test_a_slowed_bridge_needs_sim_time():
    # A world slowed against the wall clock keeps its time only on /clock.
    assert params.BridgeSettings(real_time_factor=0.25).real_time_factor == 0.25
    with pytest.raises(params.ConfigError, match='real_time_factor 0.25 needs publish_clock'):
        params.BridgeSettings(real_time_factor=0.25, publish_clock=False)
