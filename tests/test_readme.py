"""The README as a user reads it: its Python example runs, it stays short, it points only
at files the repository has, and it names no issue numbers or commit hashes."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.mnist
def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 1
    from sparsenet.data import resolve_data_dir

    monkeypatch.setenv("SPARSENET_DATA", str(resolve_data_dir().absolute()))  # ./data, seen from here
    monkeypatch.chdir(tmp_path)  # it writes runs/demo/ relative to the working directory
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "test error" in out and "fewer parameters" in out
    shown = re.search(r"```python\n.*?```\n\n[^\n]*prints[^\n]*\n\n```text\n(.*?)```", README.read_text(), re.S)
    words = lambda text: [re.findall(r"[A-Za-z]{3,}", line) for line in text.strip().splitlines()]
    assert shown and words(out) == words(shown.group(1)), out  # the output the README shows, numbers aside
    assert (tmp_path / "runs" / "demo" / "lenet.h5").is_file()


def test_the_readme_is_one_short_story():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    assert not re.search(r"(issue|PR) ?#\d+", text, flags=re.I)
    assert not re.search(r"\b[0-9a-f]{7,40}\b", text), "commit hashes belong in reports, not the README"
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (README.parent / link).exists(), link
    for placeholder in ("QS_IDLE", "RESULTS_TABLE", "EXPORT_LINE"):
        assert placeholder not in text, placeholder
