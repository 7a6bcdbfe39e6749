"""Smoke test of the main job: `python -m fp4compile demo` on the tiny preset, a few steps."""
import re

import pytest

from fp4compile.__main__ import main

pytestmark = pytest.mark.slow


def test_demo_runs_both_recipes_and_reports_the_sites(capsys):
    assert main(["demo", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32"]) == 0
    text = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^(paper|bf16)\s+([\d.]+)\s+([\d.]+)\s+\d+", text, re.M)}
    assert set(rows) == {"paper", "bf16"}
    for match in rows.values():
        assert 0 < float(match.group(3)) < 10  # a finite validation loss, in nats per byte
    assert "val-loss gap of paper to bf16" in text
    # Block by block: one compiled graph, every block linear quantized, none skipped.
    assert "[graph 0, recipe paper] quantized 7/7 matmuls" in text
    assert "Compiled block by block" in text
