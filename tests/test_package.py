"""The package as a reader meets it: the paper map in its docstring resolves, the public
API is importable, and the structure stays as promised (no private helper imported
across modules, no duplicated blocks)."""
import ast
import importlib
import pathlib
import re

import sparsenet

PACKAGE = pathlib.Path(sparsenet.__file__).parent


def _resolve(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_paper_section_in_the_package_docstring_resolves():
    rows = [l for l in sparsenet.__doc__.splitlines() if re.match(r"(step|§|the mask|layers|storage|sparse|Table|Fig|the paper)", l)]
    sections = {r.split("  ")[0] for r in rows}
    for s in ("§3.1", "§3.2", "§3.3", "§3.4", "§3.5", "step 2", "Fig. 4", "Fig. 5", "Fig. 6"):
        assert any(x.startswith(s) for x in sections), s
    names = re.findall(r":(?:func|class|meth|mod):`([\w.]+)`", sparsenet.__doc__)
    assert len(names) >= 20
    for name in names:
        obj = _resolve(name)
        assert callable(obj) or hasattr(obj, "__file__"), name


def test_public_api():
    for name in sparsenet.__all__:
        assert getattr(sparsenet, name).__doc__, name


def test_no_module_imports_another_modules_private_helpers():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in {"L", "P", "F", "fast", "layers", "pruning", "engine"}:
                    raise AssertionError(f"{path.name} uses {base.id}.{node.attr}")


def test_nothing_points_outside_the_repository():
    root = PACKAGE.parent
    files = [*PACKAGE.glob("*.py"), root / "README.md", *root.glob("docs/*.md"), *root.glob("reproduce/*.md"),
             *root.glob("benchmarks/*")]
    for path in files:
        if path.is_file():
            text = path.read_text()
            outside = "/".join(["..", "shared"])  # the workspace's folder, absent from users' clones
            assert outside not in text and "PAPER.md" not in text, path
