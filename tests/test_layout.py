"""The layering of the top-level packages: the core (`mimo/`) imports none of the tools around it.

    mimo      core: models, engine, processing, the Triton-free serving adapters
    client    over tritonclient only
    builders  offline artifacts (checkpoints, repositories) over the core
    tools     host-side processes (launcher, server process, demo) over all of them
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "mimo": {"mimo"},
    "client": {"client"},
    "builders": {"builders", "mimo"},
    "tools": {"tools", "builders", "client", "mimo"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages `path` imports (absolute imports; relative ones stay in their package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    wrong = {str(f.relative_to(ROOT)): sorted(project_imports(f) - ALLOWED[package]) for f in files}
    assert {f: names for f, names in wrong.items() if names} == {}


def test_the_scan_sees_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import builders.tiny\nfrom tools.demo import main\nfrom . import x\nimport numpy\n")
    assert project_imports(module) == {"builders", "tools"}
