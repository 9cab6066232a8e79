"""``sparse-policy export``: a model directory's graphs for ONNX Runtime or TensorRT.

``--format onnx`` writes one graph per piece the sparse loop calls (vision encoder per
camera, observation and time tokens, memory keys/values, embedding, every residual unit, head,
each pruner) and ``manifest.json`` (shapes, opset, ``policy_sha256``, torch version); see
:mod:`sparse_policy_node.core.onnx_export`. ``--format tensorrt`` builds TensorRT engines from
those graphs (needs ``tensorrt`` and a CUDA GPU). By default both go where the engine looks
for them (``<model>/.backend_cache/``), so a node started with ``backend: onnxruntime`` or
``tensorrt`` finds them ready; ``--out`` writes the ONNX graphs elsewhere.
"""

import json

from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import resolve_model


def add_arguments(parser):
    """Register the command's options."""
    add_model_argument(parser, positional=True)
    parser.add_argument('--format', default='onnx', choices=('onnx', 'tensorrt'),
                        help='ONNX graphs, or TensorRT engines built from them')
    parser.add_argument('--out', default=None,
                        help="folder for the ONNX graphs (default: the model's backend cache, "
                             'where backend onnxruntime / tensorrt looks)')
    parser.add_argument('--precision', default='float32', choices=('float32', 'float16'),
                        help='TensorRT engine precision')
    parser.add_argument('--device', default='cuda', help='CUDA device of the TensorRT engines')


def run(args) -> int:
    """Export the graphs (and build engines); print where they are.

    A missing or corrupt model, a missing TensorRT and a failed export raise the project's
    errors (``CheckpointError``, ``ConfigError``, ``ExportError``), which ``sparse-policy``
    reports in one line with exit status 2.
    """
    from sparse_policy_node.core.backends import ensure_onnx
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import load_pruners
    resolve_model(args, 'export')
    if args.format == 'tensorrt':
        from sparse_policy_node.core.tensorrt_backend import check_tensorrt
        check_tensorrt(args.device)  # fail before the export, not after
    check_model_dir(args.model, weights=False)
    policy = load_policy(args.model, 'cpu')
    pruners = load_pruners(args.model, 'cpu')
    directory, manifest = ensure_onnx(policy, pruners, args.model, args.out)
    result = {'format': args.format, 'onnx_dir': directory, 'opset': manifest['opset'],
              'graphs': len(manifest['graphs']), 'policy_sha256': manifest['policy_sha256']}
    if args.format == 'tensorrt':
        from sparse_policy_node.core.tensorrt_backend import load_trt_graphs
        result['engine_dir'], _ = load_trt_graphs(directory, manifest, args.device,
                                                  args.precision)
    print(json.dumps(result, indent=1))
    return 0
