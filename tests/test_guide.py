"""docs/guide.md runs: its Python blocks, executed top to bottom in one namespace, raise
nothing, print output shaped like the output the guide shows, and reach the results the
prose claims. The guide covers every part of the paper it promises."""
import contextlib
import io
import re
import shutil
from pathlib import Path

import numpy
import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\s*Output:\s*\n\s*```text\n(.*?)```)?", flags=re.S)


def _blocks(text):
    """``[(code, shown output or None)]`` in the guide's order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def _words(output):
    """Per line, the words of three letters or more: what stays when the numbers change."""
    return [re.findall(r"[A-Za-z]{3,}", line) for line in output.strip("\n").splitlines()]


def test_the_guide_covers_the_paper():
    text = GUIDE.read_text()
    for mark in ("§3.1", "§3.2", "§3.3", "§3.4", "§3.5", "Fig. 7", "Network.freeze"):
        assert mark in text, mark
    blocks = _blocks(text)
    assert len(blocks) >= 9
    assert text.count("```python") == len(blocks)
    assert all(out is not None for _, out in blocks[:3]), "the first steps show their output"


@pytest.mark.mnist
def test_the_guide_runs():
    blocks = _blocks(GUIDE.read_text())
    ns = {"__name__": "__guide__"}
    try:
        for i, (code, shown) in enumerate(blocks, 1):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    exec(compile(code, f"docs/guide.md, python block {i}", "exec"), ns)
                except Exception as e:
                    raise AssertionError(f"python block {i} of docs/guide.md raised {type(e).__name__}: {e}") from e
            printed = buf.getvalue()
            if shown is None:
                assert not printed.strip(), f"block {i} prints output the guide does not show:\n{printed}"
            else:  # loosely: the same lines and words; numbers may differ with the BLAS library
                assert _words(printed) == _words(shown), f"block {i} printed:\n{printed}\nthe guide shows:\n{shown}"

        import sparsenet

        work = ns["work"]
        assert not Path(work).resolve().is_relative_to(GUIDE.parent.parent), "the guide writes into the repository"
        net = ns["net"]
        # what the prose claims
        sparsenet.pruning.check_masks(net)
        for copy in ns["retrained"].values():
            sparsenet.pruning.check_masks(copy)
        left = sparsenet.pruning.densities(net)  # the schedule's targets, less what §3.5 removed
        for layer, target in {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}.items():
            assert target - 0.01 < left[layer] <= target + 1e-3, (layer, left[layer])
        assert net.error(ns["x_test"], ns["t_test"]) < 0.15
        assert ns["diff"] < 1e-4 and ns["same"] is True
        assert ns["rates"]["drop1"] == pytest.approx(0.5 * 0.1 ** 0.5, rel=1e-3)
        assert numpy.all(ns["W"].data[ns["W"].mask == 0] == 0)
        assert sparsenet.load_model(work / "lenet.h5").count_nonzero() == net.count_nonzero()
    finally:
        if "work" in ns:
            shutil.rmtree(ns["work"], ignore_errors=True)
