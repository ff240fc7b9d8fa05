"""The documentation's examples run as written, so they cannot rot; its links point at files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("README.md", "docs/guide.md")
"""Files whose ```python blocks, run in order in one namespace, are complete programs (a later
block may use what an earlier one made, as a reader following the page would)."""
TEST_COMMAND = 'python -m pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / name).read_text(), re.S | re.M)


@pytest.mark.parametrize("name", EXAMPLES)
def test_python_examples_run(name, tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(name)
    assert blocks, f"{name} has no python example"
    monkeypatch.chdir(tmp_path)  # examples may write files
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: see docs/demo.md#threads
    namespace = {"__name__": "__main__"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{name} example {i + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out


def test_readme_example_prunes_and_shrinks(tmp_path, monkeypatch, capsys):
    namespace = {"__name__": "__main__"}
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    exec(compile(_python_blocks("README.md")[0], "README example", "exec"), namespace)
    result, dense = namespace["result"], namespace["dense"]
    assert result.accuracy >= dense - 0.01 and result.sparsity > 0.5
    small = result.structured.model
    x = namespace["x_val"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), result.model(x), rtol=1e-4, atol=1e-4)


def test_readme_keeps_the_ci_test_command_and_the_venv_line():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert TEST_COMMAND in lines  # .ci/run greps for this exact line
    assert "python3 -m venv .venv && . .venv/bin/activate" in lines


@pytest.mark.parametrize("name", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_at_files(name):
    page = ROOT / name
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{name} links to missing {target}"
