"""``sparse-policy import-dp`` end to end: sidecar config, refusing pickle, ``--trust-pickle``."""

import argparse
import json

import dp_reference as ref
import pytest
from safetensors.torch import save_file
from sparse_policy_node.cli import main
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.core.checkpoint import read_metadata
import torch
import yaml

OBS_META = {'camera_0': {'shape': [3, 40, 40], 'type': 'rgb'},
            'robot_eef_pose': {'shape': [6], 'type': 'low_dim'}}


@pytest.fixture
def dp_run(tmp_path):
    """Make a DP run: EMA weights as safetensors and the run's .hydra/config.yaml (unresolved)."""
    cfg = ref.dp_config(OBS_META, horizon=16, n_action_steps=8, num_inference_steps=8)
    state = ref.dp_state_dict(cfg)
    weights = tmp_path / 'ema.safetensors'
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    config = tmp_path / 'config.yaml'
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg, state, weights, config


def test_import_with_yaml_config_carries_it(dp_run, tmp_path, capsys):
    _, _, weights, config = dp_run
    out = tmp_path / 'model'
    assert main(['import-dp', str(weights), str(out), '--config', str(config)]) == 0
    assert 'ddim-8' in capsys.readouterr().out
    policy = load_policy(str(out))
    c = policy.config
    assert (c.scheduler.sampler, c.scheduler.num_inference_steps, c.n_action_steps) == (
        'ddim', 8, 8)
    assert c.obs.vision.cameras == ('camera_0',) and c.obs.vision.feature_activation == 'relu'
    assert c.obs.order == ('camera_0_image', 'robot_eef_pose')
    assert read_metadata(str(out))['dp_obs_keys'] == ['camera_0', 'robot_eef_pose']


def test_json_config_works_too(dp_run, tmp_path):
    cfg, _, weights, _ = dp_run
    path = tmp_path / 'dp_config.json'
    path.write_text(json.dumps(cfg))
    assert main(['import-dp', str(weights), str(tmp_path / 'm'), '--config', str(path)]) == 0


def _workspace_ckpt(path, cfg, state):
    # A workspace payload like DP's: the Hydra config plus objects weights_only refuses.
    torch.save({'cfg': cfg, 'state_dicts': {'ema_model': state, 'model': state},
                'pickles': argparse.Namespace(epoch=3)}, str(path))


def test_workspace_ckpt_is_refused_without_trust_pickle(dp_run, tmp_path):
    cfg, state, _, _ = dp_run
    ckpt = tmp_path / 'latest.ckpt'
    _workspace_ckpt(ckpt, cfg, state)
    with pytest.raises(SystemExit, match='without unpickling.*OmegaConf.*--trust-pickle'):
        main(['import-dp', str(ckpt), str(tmp_path / 'm')])
    assert not (tmp_path / 'm').exists()


def test_trust_pickle_reads_weights_and_config_with_a_warning(dp_run, tmp_path, capsys):
    cfg, state, _, _ = dp_run
    ckpt = tmp_path / 'latest.ckpt'
    _workspace_ckpt(ckpt, cfg, state)
    out = tmp_path / 'm'
    assert main(['import-dp', str(ckpt), str(out), '--trust-pickle']) == 0
    assert 'WARNING: --trust-pickle' in capsys.readouterr().err
    assert load_policy(str(out)).config.scheduler.num_inference_steps == 8


def test_without_config_it_warns_that_it_guesses(tmp_path, capsys):
    meta = {'agentview_image': {'shape': [3, 84, 84], 'type': 'rgb'},
            'robot0_eef_pos': {'shape': [3]}}
    cfg = ref.dp_config(meta, crop=(76, 76))
    weights = tmp_path / 'ema.safetensors'
    save_file(ref.dp_state_dict(cfg), str(weights))
    assert main(['import-dp', str(weights), str(tmp_path / 'm')]) == 0
    assert 'guessed' in capsys.readouterr().err
    assert load_policy(str(tmp_path / 'm')).config.scheduler.sampler == 'ddpm'


def test_unet_config_gives_a_clear_error(dp_run, tmp_path):
    cfg, _, weights, _ = dp_run
    cfg['policy']['_target_'] = 'diffusion_policy.policy.DiffusionUnetHybridImagePolicy'
    path = tmp_path / 'unet.json'
    path.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match='U-Net.*not|only the transformer'):
        main(['import-dp', str(weights), str(tmp_path / 'm'), '--config', str(path)])


def test_bad_config_file_is_a_clear_error(dp_run, tmp_path):
    _, _, weights, _ = dp_run
    path = tmp_path / 'bad.yaml'
    path.write_text('policy: [unclosed\n')
    with pytest.raises(SystemExit, match='cannot be parsed'):
        main(['import-dp', str(weights), str(tmp_path / 'm'), '--config', str(path)])


def test_import_writes_a_model_card(dp_run, tmp_path):
    from sparse_policy_node.core.model_card import read_card
    _, _, weights, config = dp_run
    out = tmp_path / 'model'
    assert main(['import-dp', str(weights), str(out), '--config', str(config)]) == 0
    policy = load_policy(str(out))
    card = read_card(str(out), policy.config)   # checked against the model
    assert card['action']['dim'] == policy.config.transformer.action_dim
    assert card['action']['space'] in ('delta_eef', 'abs_eef_pose', 'joint_pos')
    assert card['control_rate_hz'] > 0 and set(card['cameras']) == {'camera_0'}
    assert card['inputs']['robot_eef_pose']['dim'] == 6
