"""Every ```python block of the README runs, in order, in one fresh interpreter (later blocks use
names the earlier ones define, as a reader pasting them into one session would)."""
import os
import re
import subprocess
import sys

import twicediff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

_RUNNER = r"""
import json, sys
blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for line, source in blocks:
    print(f"--- README.md block at line {line}", flush=True)
    exec(compile(source, f"README.md, block at line {line}", "exec"), namespace)
"""


def python_blocks(text):
    """[(line number of the block's first code line, source)] for each ```python fence."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def test_readme_has_python_blocks():
    with open(README) as f:
        blocks = python_blocks(f.read())
    assert len(blocks) >= 5


def test_readme_python_blocks_run():
    import json

    with open(README) as f:
        blocks = python_blocks(f.read())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(twicediff.__file__))] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks), capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout
    assert "torch.Size([10, 200])" in printed
    assert "False" not in printed, printed  # every check the README prints is True
    assert printed.count("True") == 2


def test_readme_relative_links_exist():
    with open(README) as f:
        text = f.read()
    targets = {t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t}
    missing = sorted(t for t in targets if not os.path.exists(os.path.join(ROOT, t)))
    assert targets and not missing, f"README links to missing paths: {missing}"
