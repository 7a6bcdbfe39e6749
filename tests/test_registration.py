"""The `fp4` backend is reachable by name with and without `import fp4compile`,
in either order, without dynamo's "duplicate name" error."""
import subprocess
import sys
import textwrap

import pytest

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)


def _installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "fp4" for ep in entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _installed(), reason="package not installed (run scripts/setup.sh): no entry point")
def test_entry_point_without_import_then_import():
    result = _run(
        """
        import sys, torch
        from torch._dynamo.backends.registry import lookup_backend
        fn = lookup_backend("fp4")          # found through the entry point
        assert "fp4compile" not in sys.modules  # loading the entry point imported nothing
        import fp4compile                    # registering again must not raise
        from fp4compile.report import reports
        m = torch.nn.Linear(32, 32)
        torch.compile(m, backend="fp4_eager")(torch.randn(4, 32))
        assert len(reports()[0].quantized) == 1
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_import_then_lookup_and_reimport():
    result = _run(
        """
        import importlib, torch, fp4compile
        from torch._dynamo.backends.registry import lookup_backend, list_backends
        assert lookup_backend("fp4") is fp4compile.backend.fp4_backend
        for name in ("fp4_eager", "fp4_aot_eager"):
            lookup_backend(name)
        fp4compile.backend.register_backends()  # a second registration is a no-op
        assert "fp4" in list_backends(exclude_tags=())
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
