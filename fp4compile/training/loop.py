"""The training loop shared by the benchmarks: same schedule, same data, any compiled model.

A comparison of FP4 recipes is only fair if everything except the recipe is
identical: initial weights, the order of training batches, the optimizer, the
learning-rate schedule and the validation set. :func:`train` fixes all of
those from a :class:`TrainConfig` and takes the compiled forward pass as an
argument, so the caller chooses the recipe by compiling the model with it.

Divergence is a measurement, not an error: a NaN or Inf loss (or gradient
norm) ends that run with ``diverged=True``. Checkpoints hold everything that
determines the rest of a run (weights, optimizer moments, data-stream and RNG
state), so a resumed run on CPU continues bit-for-bit like an uninterrupted one.

A late precision switch (``fp4compile.PrecisionSwitch``, the ``precision_switch``
argument of :func:`train`) recompiles the model in place with a higher-precision
recipe before a given step; from then on the loop calls the model itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fp4compile.training.data import BatchSampler, val_batches
from fp4compile.training.models.llama import Llama, LlamaConfig

__all__ = [
    "TrainConfig",
    "StepRecord",
    "TrainResult",
    "build_model",
    "lr_at",
    "make_optimizer",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "train",
]

_AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Hyperparameters of one training run."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor: one tenth of the peak, as in LLaMA
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 measures the norm without clipping
    eval_every: int = 50  # steps between validation passes (the last step is always evaluated)
    eval_sequences: int = 256  # validation windows: one fixed set, identical for every recipe and step
    seed: int = 0
    # Autocast dtype of the forward pass: "float32" (no autocast) or "bfloat16".
    # Parameters and optimizer state stay float32 either way.
    dtype: str = "float32"
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_AUTOCAST_DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("steps, batch_size and seq_len must be positive")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be between 0 and steps")


@dataclass
class StepRecord:
    """What one optimizer step logged. ``val_loss`` is NaN on steps without evaluation."""

    step: int  # 1-based count of optimizer steps taken (or attempted, for a diverged step)
    tokens: int  # training tokens seen up to and including this step
    train_loss: float
    val_loss: float
    grad_norm: float
    lr: float
    step_time_s: float  # forward + backward + optimizer step, synchronized; excludes evaluation

    CSV_FIELDS = ("step", "tokens", "train_loss", "val_loss", "grad_norm", "step_time_s", "lr")

    def as_row(self) -> dict:
        return {name: getattr(self, name) for name in self.CSV_FIELDS}


@dataclass
class TrainResult:
    history: list[StepRecord] = field(default_factory=list)
    diverged: bool = False
    diverged_at_step: int | None = None
    steps_completed: int = 0
    tokens_per_s: float = float("nan")  # median over steps, so compilation and stragglers don't count
    wall_time_s: float = 0.0  # of this call only (a resumed run counts from the resume)

    @property
    def final_val_loss(self) -> float:
        """Validation loss at the last evaluation; NaN if the run diverged or never evaluated."""
        if self.diverged:
            return float("nan")
        for record in reversed(self.history):
            if not math.isnan(record.val_loss):
                return record.val_loss
        return float("nan")

    @property
    def final_train_loss(self) -> float:
        return self.history[-1].train_loss if self.history else float("nan")


def build_model(config: LlamaConfig, seed: int, device: torch.device | str = "cpu") -> Llama:
    """A :class:`~fp4compile.training.models.llama.Llama` initialized from ``torch.manual_seed(seed)``.

    Initialization runs on the CPU and is then moved, so a seed gives the same
    weights on every device and for every recipe.
    """
    torch.manual_seed(seed)
    return Llama(config).to(device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step with 0-based index ``step``.

    Linear warmup reaching ``lr`` at step ``warmup_steps - 1``, then a cosine
    from ``lr`` at step ``warmup_steps`` to exactly ``min_lr`` at the last step
    ``steps - 1``. Ratios are formed from integers, so the schedule's
    endpoints are exact.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.steps - 1 - cfg.warmup_steps
    if decay_steps <= 0:
        return cfg.lr
    progress = min(step - cfg.warmup_steps, decay_steps) / decay_steps
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linears, embedding) and none on norm gains."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": cfg.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.adam_betas, eps=cfg.adam_eps)


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = _AUTOCAST_DTYPES[cfg.dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def evaluate(
    compiled_forward: Callable[[torch.Tensor], torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
) -> float:
    """Mean per-token cross-entropy (nats) over all validation batches.

    The forward runs with autograd recording (its graph is dropped, never
    backpropagated): under `torch.no_grad` dynamo guards on the grad mode and
    compiles a second, inference-only graph, which for an fp4 recipe costs
    about as much Inductor time as the training graph. The values are the same
    either way; the price is the saved activations of one batch.
    """
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    for x, y in batches:
        with _autocast(cfg, device):
            logits = compiled_forward(x)
        total_loss += _loss(logits.detach(), y, reduction="sum").double()
        total_tokens += y.numel()
    return (total_loss / total_tokens).item()


def _rng_states() -> dict:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list[StepRecord],
    sampler_state: dict,
    rng_states: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write everything needed to continue a run after ``step`` optimizer steps.

    ``rng_states`` defaults to the current torch CPU/CUDA generator states.
    The file is written to a temporary name and renamed, so an interruption
    while saving never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": [asdict(record) for record in history],
        "sampler": sampler_state,
        "rng": rng_states if rng_states is not None else _rng_states(),
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load weights (and optimizer state) in place and restore the RNG states.

    Returns the checkpoint's ``step``, ``history`` (as :class:`StepRecord`),
    ``sampler`` state and ``extra`` dict.
    """
    # Loaded on the CPU: RNG and generator states must be CPU tensors, and
    # load_state_dict moves weights and optimizer moments to the parameters' device.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    _restore_rng_states(payload["rng"])
    return {
        "step": payload["step"],
        "history": [StepRecord(**record) for record in payload["history"]],
        "sampler": payload["sampler"],
        "extra": payload["extra"],
    }


def train(
    model: nn.Module,
    compiled_forward: Callable[[torch.Tensor], torch.Tensor],
    cfg: TrainConfig,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    on_step: Callable[[StepRecord], None] | None = None,
    progress: bool = True,
    desc: str = "",
    *,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    precision_switch=None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` AdamW steps through ``compiled_forward``.

    ``model`` owns the parameters (the optimizer and checkpoints use it);
    ``compiled_forward`` maps ``idx[b, s]`` to logits and normally is
    ``torch.compile(model, ...)``. ``on_step`` is called with each step's
    record after logging (and after checkpointing). With ``checkpoint_path``,
    a checkpoint is written every ``checkpoint_every`` steps (0: only at the
    end); with ``resume=True`` and an existing checkpoint, training continues
    from it.

    ``precision_switch``: a :class:`fp4compile.PrecisionSwitch` whose
    ``total_steps`` is ``cfg.steps``. Before each step the loop calls its
    ``maybe_switch(model, steps_taken)``; once it recompiled ``model`` in place,
    the loop trains and evaluates through ``model`` instead of
    ``compiled_forward`` (a wrapper made before the switch keeps the old recipe),
    and prints the switch's one-line message. The parameters, and so the
    optimizer and checkpoints, are unchanged by the switch.
    """
    if precision_switch is not None and precision_switch.total_steps != cfg.steps:
        raise ValueError(f"precision_switch.total_steps={precision_switch.total_steps} but the run has "
                         f"cfg.steps={cfg.steps}")
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    sampler = BatchSampler(train_data, cfg.batch_size, cfg.seq_len, seed=cfg.seed, device=device)
    validation = val_batches(val_data, cfg.batch_size, cfg.seq_len, cfg.eval_sequences, device=device)
    tokens_per_step = cfg.batch_size * cfg.seq_len

    history: list[StepRecord] = []
    start_step = 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, model, optimizer)
        start_step = state["step"]
        history = state["history"]
        sampler.load_state_dict(state["sampler"])

    result = TrainResult(history=history, steps_completed=start_step)
    params = [p for p in model.parameters() if p.requires_grad]
    # max_norm=inf measures the global norm without changing the gradients.
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

    def checkpoint(step: int) -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, model, optimizer, step, history, sampler.state_dict())

    wall_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)
    model.train()
    try:
        for step_index in range(start_step, cfg.steps):
            step = step_index + 1
            if precision_switch is not None and precision_switch.maybe_switch(model, step_index):
                compiled_forward = model  # compiled in place with the new recipe
                tqdm.write(f"{desc + ': ' if desc else ''}{precision_switch.event}")
            lr = lr_at(step_index, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = sampler.next_batch()

            _synchronize(device)
            t0 = time.perf_counter()
            with _autocast(cfg, device):
                logits = compiled_forward(x)
            loss = _loss(logits, y)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            train_loss = loss.item()
            grad_norm_value = grad_norm.item()
            finite = math.isfinite(train_loss) and math.isfinite(grad_norm_value)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            step_time = time.perf_counter() - t0

            val_loss = float("nan")
            if finite and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss = evaluate(compiled_forward, validation, cfg, device)
                model.train()

            record = StepRecord(
                step=step,
                tokens=step * tokens_per_step,
                train_loss=train_loss,
                val_loss=val_loss,
                grad_norm=grad_norm_value,
                lr=lr,
                step_time_s=step_time,
            )
            history.append(record)
            bar.update(1)
            postfix = {"loss": f"{train_loss:.4f}"}
            last_val = next((r.val_loss for r in reversed(history) if not math.isnan(r.val_loss)), None)
            if last_val is not None:
                postfix["val"] = f"{last_val:.4f}"
            bar.set_postfix(postfix, refresh=False)

            if not finite:
                # The weights were not updated with the non-finite gradient, but
                # the run is over: the recipe could not train at this point.
                result.diverged = True
                result.diverged_at_step = step
                if on_step is not None:
                    on_step(record)
                break

            result.steps_completed = step
            if checkpoint_every > 0 and step % checkpoint_every == 0 and step != cfg.steps:
                checkpoint(step)
            if on_step is not None:
                on_step(record)
        else:
            checkpoint(cfg.steps)
    finally:
        bar.close()

    result.wall_time_s = time.perf_counter() - wall_start
    step_times = [r.step_time_s for r in history if math.isfinite(r.train_loss)]
    if step_times:
        result.tokens_per_s = tokens_per_step / statistics.median(step_times)
    return result
