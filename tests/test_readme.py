"""The README's Python blocks run as written, in order, in one namespace (later blocks use earlier names), on
whatever device this machine has: the README is the front door, and a block that stopped working would be the
first thing a new user meets."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of ``text``, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 3


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block saves a state dict to the working directory
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(python_blocks(README.read_text()), start=1):
        code = compile(block, f"README.md python block {number}", "exec")
        exec(code, namespace)  # noqa: S102 - the README's own examples
    assert (tmp_path / "sparse.pt").exists()
