"""Model cards: derived at save time, shipped for models/lift, checked against the model."""

import json
import os

import pytest
from sparse_policy_node.cli import main
from sparse_policy_node.core import model_card as mc
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.core.checkpoint import save_policy
from sparse_policy_node.core.config import tiny_config
from sparse_policy_node.core.policy import DiffusionPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIFT = os.path.join(ROOT, 'models', 'lift')
ENV_ARGS = {'env_name': 'Lift', 'env_kwargs': {'control_freq': 20, 'robots': 'Panda'}}


def test_shipped_lift_card_matches_the_model_and_the_command_that_writes_it(capsys):
    config = load_policy_config(LIFT)
    card = mc.read_card(LIFT, config)
    assert card['action']['space'] == 'delta_eef'
    assert card['action']['scaling'] == {'position_m_per_unit': 0.05,
                                         'rotation_rad_per_unit': 0.5}
    assert card['action']['gripper']['index'] == 6 and card['control_rate_hz'] == 20.0
    assert card['action']['delta_reference'] == 'measured'   # robosuite OSC: goal = pose + delta
    assert card['frames']['pose_frame'] == 'world'
    assert card['inputs']['robot0_eef_pos'] == {'dim': 3, 'unit': 'm', 'frame': 'world',
                                                'meaning': 'end-effector position'}
    # The shipped file is exactly what `sparse-policy model-card models/lift` derives.
    assert main(['model-card', LIFT]) == 0
    assert json.loads(capsys.readouterr().out) == card


def test_save_policy_writes_a_card_when_the_metadata_tells(tmp_path):
    policy = DiffusionPolicy(tiny_config())
    save_policy(policy, str(tmp_path / 'sim'), metadata={'env_args': ENV_ARGS})
    card = mc.read_card(str(tmp_path / 'sim'), policy.config)
    assert card['action']['space'] == 'delta_eef' and card['cameras']['agentview'][
        'image_size'] == [32, 32]
    save_policy(policy, str(tmp_path / 'bare'))
    assert mc.read_card(str(tmp_path / 'bare')) is None
    assert main(['model-card', str(tmp_path / 'bare')]) == 1   # says it cannot tell


@pytest.mark.parametrize('edit, message', [
    (lambda c: c['action'].update(space='twist'), 'action.space'),
    (lambda c: c['action'].update(dim=8), 'action.names has 7'),
    (lambda c: c['action']['scaling'].update(position_m_per_unit=0), 'position_m_per_unit'),
    (lambda c: c['action'].update(rotation_format='quat_xyzw'), 'needs 7 arm'),
    (lambda c: c['inputs'].pop('robot0_eef_pos'), 'the card lists inputs'),
    (lambda c: c.pop('control_rate_hz'), 'lacks a field'),
])
def test_bad_cards_are_rejected_with_a_reason(tmp_path, edit, message):
    config = tiny_config()
    card = mc.robosuite_card(config, ENV_ARGS)
    edit(card)
    mc.write_card(str(tmp_path), card)
    with pytest.raises(mc.ModelCardError, match=message):
        mc.read_card(str(tmp_path), config)


def test_unreadable_card_is_a_clear_error(tmp_path):
    (tmp_path / mc.CARD_FILE).write_text('{not json')
    with pytest.raises(mc.ModelCardError, match='cannot be read'):
        mc.read_card(str(tmp_path))
