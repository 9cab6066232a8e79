"""``sparse-policy model-card``: show, derive or write a model directory's ``model_card.json``.

The card is derived from the model's config and training metadata (robosuite demonstrations:
OSC pose deltas at the dataset's control rate). ``--write`` stores it next to the weights,
where the policy node reads it.
"""

import json
import sys

from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import resolve_model


def add_arguments(parser):
    """Register the command's options."""
    add_model_argument(parser, positional=True)
    parser.add_argument('--write', action='store_true',
                        help='write model_card.json (derived from config.json) into the model '
                             '(default: only print the card)')


def run(args) -> int:
    """Print the card (derived, or the stored one); write it with ``--write``.

    A missing or corrupt model directory or card raises ``CheckpointError`` /
    ``ModelCardError``: one line from ``sparse-policy``, exit status 2.
    """
    from sparse_policy_node.core.checkpoint import read_metadata
    from sparse_policy_node.core.model_card import default_card
    from sparse_policy_node.core.model_card import read_card
    from sparse_policy_node.core.model_card import write_card
    resolve_model(args, 'model-card')
    config = check_model_dir(args.model, weights=False)
    card = default_card(config, read_metadata(args.model))
    stored = read_card(args.model, config)
    if card is None and stored is None:
        print(f'model-card: {args.model} has no card and its metadata does not say how its '
              f'actions were recorded; write model_card.json by hand (see '
              f'sparse_policy_node/core/model_card.py)', file=sys.stderr)
        return 1
    if args.write and card is not None:
        print(f'model-card: wrote {write_card(args.model, card)}', file=sys.stderr)
    print(json.dumps(card if card is not None else stored, indent=2))
    return 0
