"""``sparse-policy model-card``: show, derive or write a model directory's ``model_card.json``.

The card is derived from the model's config and training metadata (robosuite demonstrations:
OSC pose deltas at the dataset's control rate). ``--write`` stores it next to the weights,
where the policy node reads it.
"""

import json
import sys


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('model', help='model directory')
    parser.add_argument('--write', action='store_true',
                        help='write model_card.json (derived from config.json) into the model')


def run(args) -> int:
    """Print the card (derived, or the stored one); write it with ``--write``."""
    from sparse_policy_node.core.checkpoint import CheckpointError
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.checkpoint import read_metadata
    from sparse_policy_node.core.model_card import default_card
    from sparse_policy_node.core.model_card import ModelCardError
    from sparse_policy_node.core.model_card import read_card
    from sparse_policy_node.core.model_card import write_card
    try:
        config = load_policy_config(args.model)
        card = default_card(config, read_metadata(args.model))
        stored = read_card(args.model, config)
    except (CheckpointError, ModelCardError) as exc:
        print(f'model-card: {exc}', file=sys.stderr)
        return 1
    if card is None and stored is None:
        print(f'model-card: {args.model} has no card and its metadata does not say how its '
              f'actions were recorded; write model_card.json by hand (see '
              f'sparse_policy_node/core/model_card.py)', file=sys.stderr)
        return 1
    if args.write and card is not None:
        print(f'model-card: wrote {write_card(args.model, card)}', file=sys.stderr)
    print(json.dumps(card if card is not None else stored, indent=2))
    return 0
