"""training/ imports in one direction; each evaluation variant is built in one place."""

import ast
import os

import pytest
from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.training.variants import DensePolicy
from sparse_policy_node.training.variants import make_variant
from sparse_policy_node.training.variants import variant_runtime
from test_training_frontier import model_with_pruners

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'sparse_policy_node')
TRAINING = os.path.join(PACKAGE, 'training')
PREFIX = 'sparse_policy_node.training.'
# Constructors that make a variant; only variants.py may call them inside training/.
BUILDERS = ('DensePolicy', 'SparseVariant', 'RuntimeConfig')


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def training_modules():
    return sorted(f[:-3] for f in os.listdir(TRAINING) if f.endswith('.py'))


def training_imports(tree):
    """Names of the training/ modules a module imports, at any depth (function-level too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PREFIX):
                yield node.module[len(PREFIX):].split('.')[0]
            elif node.module == 'sparse_policy_node.training':
                yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PREFIX):
                    yield alias.name[len(PREFIX):].split('.')[0]


def find_cycle(graph):
    """Return one import cycle of ``{module: {imported, ...}}`` as a list, or None."""
    state = {}  # module -> 'open' while on the DFS stack, 'done' after

    def visit(node, stack):
        state[node] = 'open'
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = 'done'
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def import_graph():
    return {name: set(training_imports(parse(os.path.join(TRAINING, name + '.py')))) - {name}
            for name in training_modules()}


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_training_imports_have_one_direction():
    graph = import_graph()
    assert {'evaluate', 'frontier', 'sparse_eval', 'variants'} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)
    # The layering the refactor set: the grammar and builders below both commands.
    assert 'variants' in graph['evaluate'] and 'variants' in graph['frontier']
    assert graph['variants'] <= {'sparse_eval', 'deviation'}
    assert not graph['sparse_eval'] and not graph['deviation']


def test_every_variant_is_built_in_variants_py_only():
    offenders = []
    for name in training_modules():
        if name == 'variants':
            continue
        for node in ast.walk(parse(os.path.join(TRAINING, name + '.py'))):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(
                    node.func, 'attr', None)
                if func in BUILDERS or func in ('make_sparse_variant', '_make_probed'):
                    offenders.append(f'{name}.py:{node.lineno} calls {func}')
    assert not offenders, offenders


def test_the_matched_sparsity_is_written_once():
    places = []
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith('.py'):
                for node in ast.walk(parse(os.path.join(root, f))):
                    if isinstance(node, ast.Constant) and node.value == MATCHED_SPARSITY:
                        places.append(os.path.relpath(os.path.join(root, f), PACKAGE))
    assert places == [os.path.join('core', 'config.py')]


@pytest.mark.parametrize('name, expected', [
    ('dense', {'sparsity_enabled': False, 'sampler': 'ddpm', 'num_inference_steps': 10}),
    ('ddim-2', {'sparsity_enabled': False, 'sampler': 'ddim', 'num_inference_steps': 2}),
    ('sparse', {'gate_source': 'pruner', 'target_sparsity': -1.0, 'sampler': 'ddpm'}),
    ('omni', {'gate_source': 'pruner', 'target_sparsity': MATCHED_SPARSITY}),
    ('only-forward@ddim-4', {'gate_source': 'pruner', 'directions': ('forward',),
                             'target_sparsity': MATCHED_SPARSITY, 'num_inference_steps': 4}),
    ('static-60', {'gate_source': 'static', 'target_sparsity': 0.6}),
    ('random', {'gate_source': 'random', 'target_sparsity': MATCHED_SPARSITY}),
])
def test_eval_and_frontier_serve_a_name_with_the_same_runtime(tiny_policy, tmp_path, name,
                                                              expected):
    from dataclasses import asdict
    from sparse_policy_node.training.frontier import point_runtime
    model_dir = model_with_pruners(tiny_policy, tmp_path)
    runtime = variant_runtime(name, model_dir)
    assert {k: getattr(runtime, k) for k in expected} == expected
    served = point_runtime(name, model_dir, None)
    assert served == {k: v for k, v in asdict(runtime).items() if k in served}
    variant = make_variant(name, tiny_policy, {'model': model_dir})
    try:
        if isinstance(variant, DensePolicy):
            assert not runtime.sparsity_enabled
            assert (variant.sampler, variant.steps) == (runtime.sampler,
                                                        runtime.num_inference_steps)
        else:
            assert variant.engine.runtime == runtime
    finally:
        if hasattr(variant, 'close'):
            variant.close()
