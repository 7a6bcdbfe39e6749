"""Automatic graph dumps: every compile writes its dump when FP4COMPILE_DUMP_DIR is set."""
from __future__ import annotations

import os


def maybe_dump(gm, report) -> None:
    """Placeholder until the inspection dump lands: nothing unless the env var is set."""
    if not os.environ.get("FP4COMPILE_DUMP_DIR"):
        return
