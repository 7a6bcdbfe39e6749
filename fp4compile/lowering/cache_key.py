"""Put a hash of fp4compile's source into Inductor's compiled-graph cache key.

Inductor caches compiled graphs on disk, keyed on the traced graph and its config.
The quantize ops' backward rules are traced from this package's Python source,
and AOTAutograd's cache keys on the dynamo graph, where our ops appear only by
name: without our source in the key, editing a pass or a backward could reuse a
stale compiled graph. Inductor folds the `uuid()` of a custom graph pass into both
caches' keys, so we install a no-op pass whose uuid is the source hash.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

PACKAGE_DIR = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """SHA-256 over every .py file of the package (paths and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class SourceHashPass(CustomGraphPass):
    """A post-grad pass that changes nothing; it exists to carry the cache key."""

    def __init__(self, key: str, inner=None):
        self.key = key
        self.inner = inner  # a user's own post-grad pass, still run and keyed

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner_uuid = self.inner.uuid() if self.inner is not None and hasattr(self.inner, "uuid") else None
        return ("fp4compile", self.key, inner_uuid)


def inductor_config_patches(config) -> dict:
    """Inductor config for an fp4 compile: the source hash and the recipe in the key."""
    from torch._inductor import config as inductor_config

    user_pass = inductor_config.post_grad_custom_pre_pass
    if isinstance(user_pass, SourceHashPass):
        user_pass = user_pass.inner
    patches = {"post_grad_custom_pre_pass": SourceHashPass(f"{source_hash()}:{config!r}", user_pass)}
    if config.requantizes_weight_gradient:
        # The NVFP4/MXFP4 backward block-quantizes dY along N (input gradient) and
        # dY^T along M (weight gradient): two same-size loops over dY that the C++
        # backend fuses horizontally, and then its loop split asserts on their
        # different shapes (torch 2.13: `AssertionError: ({y0: 512, y1: 4, y2: 16},
        # {y0: 64, y1: 32, y2: 16})` in `try_loop_split`; a Hadamard transform on
        # dY^T hides it behind a GEMM). No horizontal fusion for these graphs.
        patches["cpp.max_horizontal_fusion_size"] = 0
    return patches
