"""The package layout's rules, checked on the source: they are easy to break by accident.

- `runtime/` is the target-agnostic reference: it never imports `lowering/`.
- `import fp4compile` loads the compiler, not the training application.
- The training application keeps the names users import from `fp4compile.training`.
"""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fp4compile"


def _imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
            for alias in node.names:  # `from .. import lowering`
                yield ("." * node.level) + (node.module + "." if node.module else "") + alias.name
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_runtime_never_imports_lowering():
    offenders = [
        f"{path.name}: {module}"
        for path in sorted((PACKAGE / "runtime").glob("*.py"))
        for module in _imported_modules(path)
        if "lowering" in module
    ]
    assert not offenders, offenders


def test_importing_the_compiler_does_not_load_the_training_app():
    code = "import sys, fp4compile; print(sorted(m for m in sys.modules if m.startswith('fp4compile.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_app_names():
    from fp4compile.training import TrainConfig, build_model, lr_at, train  # noqa: F401
    from fp4compile.training.models import Llama, preset  # noqa: F401
    from fp4compile.training.data import load_corpus  # noqa: F401
