"""The documentation's runnable code blocks run as written.

A fenced ``python`` block right after a ``<!-- runnable -->`` line in README.md or a page of
docs/ is executed in a fresh interpreter from the repository root and must exit cleanly.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r'^<!-- runnable -->\n```python\n(.*?)^```$', re.M | re.S)


def runnable_blocks():
    """Return (file:line, code) of every block marked runnable."""
    blocks = []
    for path in [os.path.join(ROOT, 'README.md')] + sorted(
            glob.glob(os.path.join(ROOT, 'docs', '*.md'))):
        with open(path) as f:
            text = f.read()
        for match in MARKER.finditer(text):
            line = text.count('\n', 0, match.start()) + 1
            blocks.append((f'{os.path.relpath(path, ROOT)}:{line}', match.group(1)))
    return blocks


def test_the_readme_has_a_runnable_python_api_example():
    assert any(name.startswith('README.md') and 'predict_action' in code
               for name, code in runnable_blocks())


def test_the_marker_finds_only_marked_blocks():
    text = '<!-- runnable -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n'
    assert [m.group(1) for m in MARKER.finditer(text)] == ['x = 1\n']


@pytest.mark.sim
@pytest.mark.parametrize('name, code', runnable_blocks(), ids=lambda v: str(v)[:40])
def test_runnable_block_runs_as_written(name, code):
    pytest.importorskip('robosuite')
    env = dict(os.environ, MUJOCO_GL=os.environ.get('MUJOCO_GL', 'egl'))
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f'{name}:\n{done.stderr[-3000:]}'
