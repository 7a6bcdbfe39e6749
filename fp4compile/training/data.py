"""Byte-level training data: a corpus that needs no download, and deterministic batches.

Comparing training recipes needs every recipe to see exactly the same bytes in
the same order, and a validation set large enough that differences of a
fraction of a percent in loss are not noise. This module provides:

- :func:`load_corpus`: a user's text file or folder, or by default the Python
  standard library's own ``.py`` sources, which ship with every Python and so
  make a reproducible corpus of several megabytes on any machine without
  network access (the exact bytes depend on the Python version);
- :func:`split_train_val`: a contiguous tail split, so no validation text
  leaks into training windows;
- :class:`BatchSampler`: random training windows from a seeded generator whose
  state can be saved and restored for bit-exact resumption;
- :func:`val_batches`: a fixed set of non-overlapping validation windows.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "default_corpus_files",
    "load_corpus",
    "split_train_val",
    "BatchSampler",
    "val_batches",
]

# 8 MiB: enough for a few-million-parameter model to train for thousands of
# steps without repeating much, small enough to read in well under a second.
DEFAULT_MAX_BYTES = 8 * 2**20

# Directories of the standard library that are not the library itself: third-party
# packages and the (very large, highly repetitive) regression test suites.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files, in a deterministic (sorted walk) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk itself descend in sorted order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS)
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(".py"))
    return files


def _all_files_under(folder: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return files


def _concatenate(files: list[Path], max_bytes: int | None) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for file in files:
        if max_bytes is not None and total >= max_bytes:
            break
        content = file.read_bytes()
        chunks.append(content)
        total += len(content)
    data = b"".join(chunks)
    return data if max_bytes is None else data[:max_bytes]


def load_corpus(path: str | os.PathLike | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Load a byte corpus as a 1-D ``torch.uint8`` tensor.

    ``path`` is a file, a folder (every non-hidden file under it, in sorted
    order) or None for the standard-library corpus. At most ``max_bytes`` bytes
    are kept (None keeps everything).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    if path is None:
        files = default_corpus_files()
        origin = f"the standard library at {sysconfig.get_paths()['stdlib']}"
    else:
        source = Path(path)
        if source.is_dir():
            files = _all_files_under(source)
        elif source.is_file():
            files = [source]
        else:
            raise FileNotFoundError(f"no such file or folder: {source}")
        origin = str(source)
    data = _concatenate(files, max_bytes)
    if not data:
        raise ValueError(f"the corpus from {origin} is empty")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_train_val(data: torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (train, val), val being the last ``val_fraction`` of the bytes."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(len(data) * val_fraction)
    if n_val == 0 or n_val == len(data):
        raise ValueError(f"a corpus of {len(data)} bytes is too small to split at {val_fraction}")
    return data[:-n_val], data[-n_val:]


class BatchSampler:
    """Random training windows ``(x, y)``, each ``[batch_size, seq_len]`` int64, y = x shifted by one.

    Window starts come from a ``torch.Generator`` seeded with ``seed``, so two
    samplers with the same data and seed yield the same batches in the same
    order. :meth:`state_dict`/:meth:`load_state_dict` save and restore the
    position in that stream.
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        seq_len: int,
        seed: int,
        device: torch.device | str | None = None,
    ) -> None:
        if data.dim() != 1:
            raise ValueError("data must be a 1-D byte tensor")
        # A window holds seq_len inputs plus the one extra target byte.
        self.n_starts = len(data) - seq_len
        if self.n_starts < 1:
            raise ValueError(f"{len(data)} bytes of data cannot hold a window of {seq_len + 1}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._window_offsets = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.n_starts, (self.batch_size,), generator=self.generator)
        windows = self.data[starts[:, None] + self._window_offsets].long()
        self.batches_drawn += 1
        x, y = windows[:, :-1], windows[:, 1:]
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"generator_state": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = state["batches_drawn"]


def val_batches(
    data: torch.Tensor,
    batch_size: int,
    seq_len: int,
    n_sequences: int,
    device: torch.device | str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: ``n_sequences`` disjoint windows, in batches of ``batch_size``.

    The windows (each seq_len inputs + 1 target byte) are spread evenly over
    the whole of ``data`` so the set represents all of it, and no two windows
    share a byte. The last batch is smaller when ``batch_size`` does not
    divide ``n_sequences``.
    """
    window = seq_len + 1
    if n_sequences < 1:
        raise ValueError("n_sequences must be at least 1")
    stride = len(data) // n_sequences
    if stride < window:
        raise ValueError(
            f"{len(data)} validation bytes hold at most {len(data) // window} disjoint windows "
            f"of {window} bytes, fewer than the {n_sequences} requested"
        )
    starts = torch.arange(n_sequences) * stride
    windows = data[starts[:, None] + torch.arange(window)].long()
    batches = []
    for first in range(0, n_sequences, batch_size):
        chunk = windows[first : first + batch_size]
        x, y = chunk[:, :-1], chunk[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        batches.append((x, y))
    return batches
