"""One ONNX graph per unit, or one per decoder layer with a unit selector? (issue 14).

Measurement behind the per-unit layout of ``core/onnx_export.py``. Exports the ``paper``
preset's 24 units with the package's exporter, builds each layer graph as a nested ONNX ``If``
over its three unit graphs (input ``kind``: 0 SA, 1 CA, 2 FFN), and times one call per unit at
batch 1 in ONNX Runtime (1 thread), next to eager torch. Run from the repository root:

    .venv/bin/python docs/onnx_unit_vs_layer.py
"""

import copy
import os
import tempfile
import time

import numpy as np
import onnx
from onnx import helper
from onnx import TensorProto
import onnxruntime as ort
from sparse_policy_node.core.config import make_preset
from sparse_policy_node.core.onnx_export import export_onnx
from sparse_policy_node.core.onnx_export import unit_graph_name
from sparse_policy_node.core.policy import DiffusionPolicy
import torch


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=['CPUExecutionProvider'])


def branch(unit_model, j, initializers):
    """Return the unit graph as an If branch: no inputs (outer-scope x, k, v), names prefixed."""
    g = unit_model.graph
    rename = {i.name: f'u{j}_{i.name}' for i in g.initializer}
    rename.update({o: f'u{j}_{o}' for n in g.node for o in n.output})
    nodes = []
    for n in g.node:
        n = copy.deepcopy(n)
        n.name = f'u{j}_{n.name}'
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename[o] for o in n.output]
        nodes.append(n)
    for init in g.initializer:
        init = copy.deepcopy(init)
        init.name = rename[init.name]
        initializers.append(init)
    out = rename[g.output[0].name]
    return helper.make_graph(nodes, f'b{j}', [], [
        helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])


def layer_graph(units, shapes):
    inits = []
    sa, ca, ffn = (branch(u, j, inits) for j, u in enumerate(units))
    inner = helper.make_node('If', ['is1'], ['d_in'], then_branch=ca, else_branch=ffn)
    rest = helper.make_graph([inner], 'rest', [], [
        helper.make_tensor_value_info('d_in', TensorProto.FLOAT, None)])
    nodes = [helper.make_node('Equal', ['kind', 'zero'], ['is0']),
             helper.make_node('Equal', ['kind', 'one'], ['is1']),
             helper.make_node('If', ['is0'], ['d'], then_branch=sa, else_branch=rest)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes]
    inputs.append(helper.make_tensor_value_info('kind', TensorProto.INT64, []))
    inits += [helper.make_tensor('zero', TensorProto.INT64, [], [0]),
              helper.make_tensor('one', TensorProto.INT64, [], [1])]
    graph = helper.make_graph(nodes, 'layer', inputs, [
        helper.make_tensor_value_info('d', TensorProto.FLOAT, shapes[0][1])], initializer=inits)
    return helper.make_model(graph, opset_imports=units[0].opset_import)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = DiffusionPolicy(make_preset('paper')).eval()
    model, t = policy.transformer, policy.config.transformer
    L, D, T_a, nh = t.n_layer, t.n_emb, t.horizon, t.n_head
    x, k, v = torch.randn(1, T_a, D), torch.randn(1, nh, 3, D // nh), torch.randn(1, nh, 3,
                                                                                  D // nh)
    out = tempfile.mkdtemp()
    export_onnx(policy, {}, out)
    shapes = [('x', list(x.shape)), ('k', list(k.shape)), ('v', list(v.shape))]
    units, layers = [], []
    for layer in range(L):
        ms = [onnx.load(os.path.join(out, unit_graph_name(3 * layer + j) + '.onnx'))
              for j in range(3)]
        units.append([session(m) for m in ms])
        layers.append(session(layer_graph(ms, shapes)))
    feed = {'x': x.numpy(), 'k': k.numpy(), 'v': v.numpy()}
    kinds = [np.array(j, dtype=np.int64) for j in range(3)]

    def per_unit():
        for layer in range(L):
            units[layer][0].run(None, {'x': feed['x']})
            units[layer][1].run(None, feed)
            units[layer][2].run(None, {'x': feed['x']})

    def per_layer():
        for layer in range(L):
            for j in range(3):
                layers[layer].run(None, dict(feed, kind=kinds[j]))

    def eager():
        with torch.no_grad():
            for blk in model.layers:
                blk.sa(x, model.mask)
                blk.ca(x, (k, v), model.memory_mask)
                blk.ffn(x)

    def per_call_us(fn, n=200):
        best = float('inf')
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n / (3 * L) * 1e6)
        return best

    for fn in (per_unit, per_layer, eager):
        fn()
    print('us per unit call (best of 5):', {f.__name__: round(per_call_us(f), 1)
                                            for f in (eager, per_unit, per_layer)})


if __name__ == '__main__':
    main()
