"""Smoke test of `benchmarks/step_time.py --small`: it runs, and its JSON holds the rows it prints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_step_time_small_writes_its_table(tmp_path):
    out = tmp_path / "step_time.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--small", "--regional",
         "--recipes", "paper", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["regional"] is True and result["command"].startswith("python benchmarks/step_time.py")
    names = [row["backend"] for row in result["rows"]]
    assert names == ["inductor", "fp4 paper"]
    inductor = result["rows"][0]
    assert inductor["ratio"] == 1.0 and inductor["compile_ratio"] == 1.0
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["first_step_s"] > 0
        assert f"| {row['backend']} | {row['step_ms']:.1f} |" in proc.stdout
