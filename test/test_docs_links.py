"""Every relative link and image of the Markdown documentation resolves, anchors included.

Checked: ``README.md``, every ``docs/*.md`` and ``models/README.md``. A relative target must
name an existing file or directory inside the repository (``#anchor`` stripped, http(s) and
mailto links skipped); an anchor into a Markdown file must be the GitHub-style slug of one of
its headings. Links inside fenced code blocks and inline code are not links and are skipped.
Also: README.md stays a front page (at most 350 lines), and the command tables of README.md
and docs/commands.md list every ``sparse-policy`` subcommand.
"""

import glob
import os
import re
from urllib.parse import unquote

import pytest
from sparse_policy_node.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
MAX_README_LINES = 350

FENCE = re.compile(r'^ {0,3}(`{3,}|~{3,})')
INLINE_CODE = re.compile(r'(`+)(?:(?!\1)(?:[^\n]|\n(?![ \t]*\n)))+?\1')
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s()<>]*)>?'
                         r'(?:\s+(?:"[^"]*"|\'[^\']*\'))?\s*\)')
REFERENCE_DEF = re.compile(r'^ {0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$', re.M)
HTML_LINK = re.compile(r'<(?:a|img)\s[^>]*?(?:href|src)\s*=\s*["\']([^"\']*)["\']',
                       re.IGNORECASE)
HTML_ANCHOR = re.compile(r'<[a-z]+\s[^>]*?(?:id|name)\s*=\s*["\']([^"\']+)["\']',
                         re.IGNORECASE)
HEADING = re.compile(r'^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$')
SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')


def doc_files():
    """Return the Markdown files whose links are checked, README first."""
    docs = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    return [README] + docs + [os.path.join(ROOT, 'models', 'README.md')]


def prose(text):
    """Return ``text`` with the lines of fenced code blocks blanked (line numbers kept)."""
    lines = text.split('\n')
    fence = None
    for number, line in enumerate(lines):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
        else:
            continue
        lines[number] = ''
    return '\n'.join(lines)


def github_slug(heading):
    """Return the anchor GitHub gives a heading (before de-duplication).

    Inline code and link markup keep their text; the text is lower-cased, every character
    that is not a letter, digit, underscore, hyphen or space is dropped, and spaces become
    hyphens: ``The second model, `models/can``` -> ``the-second-model-modelscan``.
    """
    text = re.sub(r'`+([^`]*)`+', r'\1', heading)
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)
    text = re.sub(r'<[^>]+>', '', text)
    text = re.sub(r'[^\w\- ]', '', text.strip().lower())
    return text.replace(' ', '-')


def anchors(path):
    """Return the anchors of a Markdown file: heading slugs (``-1``, ``-2`` for repeats)."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    found = set()
    seen = {}
    for line in prose(text).split('\n'):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f'{slug}-{count}')
    return found


def link_targets(text):
    """Yield (line number, target) of every link, image and reference definition.

    A link may span lines; inline code (even across a line break) holds no links.
    """
    text = INLINE_CODE.sub(lambda m: re.sub(r'[^\n]', 'x', m.group(0)), prose(text))
    for pattern in (INLINE_LINK, REFERENCE_DEF, HTML_LINK):
        for match in pattern.finditer(text):
            yield text.count('\n', 0, match.start()) + 1, match.group(1)


def broken_links(path, root=ROOT):
    """Return one message per link of ``path`` that does not resolve (empty: all good)."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    where = os.path.relpath(path, root)
    broken = []
    for number, target in link_targets(text):
        if SCHEME.match(target):
            continue    # http(s), mailto and other absolute URLs are not checked
        file_part, _, anchor = target.partition('#')
        file_part = unquote(file_part)
        if file_part:
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        else:
            resolved = path
        if not target or file_part.startswith('/'):
            broken.append(f'{where}:{number}: {target!r}: not a relative link')
            continue
        inside = os.path.commonpath([os.path.abspath(root), os.path.abspath(resolved)])
        if inside != os.path.abspath(root):
            broken.append(f'{where}:{number}: {target!r} points outside the repository')
            continue
        if not os.path.exists(resolved):
            broken.append(f'{where}:{number}: {target!r}: no such file or directory')
            continue
        if anchor and resolved.endswith('.md') and os.path.isfile(resolved):
            if unquote(anchor) not in anchors(resolved):
                broken.append(f'{where}:{number}: {target!r}: no heading with anchor '
                              f'#{anchor} in {os.path.relpath(resolved, root)}')
    return broken


@pytest.mark.parametrize('path', doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    """Every relative link and image of the page names an existing file, heading included."""
    assert os.path.isfile(path), f'{path} is missing'
    broken = broken_links(path)
    assert not broken, '\n'.join(broken)


def test_docs_folder_has_pages():
    """The front page's topics live in docs/*.md, so the check above is not vacuous."""
    assert len(doc_files()) >= 5


def test_readme_is_a_front_page():
    """README.md stays a front page; measurements and long sections go to docs/."""
    with open(README, encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f'README.md has {len(lines)} lines (at most {MAX_README_LINES}): move sections to '
        'docs/ and link them')


@pytest.mark.parametrize('page', ['README.md', os.path.join('docs', 'commands.md')])
def test_command_tables_list_every_subcommand(page):
    """The command tables name every ``sparse-policy`` subcommand, and no other."""
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        text = f.read()
    table = re.search(r'^\| command \| what it does \|\n((?:\|.*\n)+)', text, re.M)
    assert table, f'{page} has no "| command | what it does |" table'
    names = re.findall(r'^\| `([^`]+)` \|', table.group(1), re.M)
    assert sorted(names) == sorted(COMMANDS), page


def test_github_slugs():
    """Slugs follow GitHub's rule for the heading styles these pages use."""
    assert github_slug('The second model, `models/can`') == 'the-second-model-modelscan'
    assert github_slug('Bring your own checkpoint (Diffusion Policy DP-T)') == \
        'bring-your-own-checkpoint-diffusion-policy-dp-t'
    assert github_slug('Round 4: `pruners/ddim-5/`, learned sparsity') == \
        'round-4-prunersddim-5-learned-sparsity'
    assert github_slug('The `[build_scripts]` key') == 'the-build_scripts-key'


def test_the_check_reports_broken_links_and_anchors(tmp_path):
    """Broken files and anchors are reported; code, URLs and good links are not."""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'plot.png').write_bytes(b'')
    (tmp_path / 'other.md').write_text('# Other page\n\n## A `code` heading\n\n## Repeat\n\n'
                                       '## Repeat\n')
    page = tmp_path / 'page.md'
    page.write_text('\n'.join([
        '# Page',
        '[good](other.md) [good anchor](other.md#a-code-heading) [repeat](other.md#repeat-1)',
        '![good image](docs/plot.png) [dir](docs/) [self](#page) [web](https://example.com)',
        '[missing](nothere.md)',
        '![missing image](docs/none.png)',
        '[bad anchor](other.md#no-such-heading)',
        '[outside](../elsewhere.md)',
        '`[in code](nothere.md)`',
        '```',
        '[in a fence](nothere.md)',
        '```',
        '[ref]: missing_ref.md',
        'a link [across', 'lines](split_missing.md), `code across', 'lines [x](nothere.md)`',
    ]) + '\n')
    broken = broken_links(str(page), root=str(tmp_path))
    assert len(broken) == 6, '\n'.join(broken)
    for target in ('nothere.md', 'docs/none.png', '#no-such-heading', '../elsewhere.md',
                   'missing_ref.md', "page.md:13: 'split_missing.md'"):
        assert sum(target in message for message in broken) == 1, (target, broken)
