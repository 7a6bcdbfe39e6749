"""CUDA size policy: keep a linear in BF16 where its quantized recipe is modelled slower.

Why it exists: on a GPU a quantized linear pays memory passes (quantization,
FP8 operand casts and copies, OCC, compensation) that scale with M*K, M*N and
N*K, while its FP8 GEMMs save only FLOPs. Below a size the passes cost more
than the GEMM saving and the layer runs slower than plain BF16. The policy
(`passes/policy.py`, target "cuda") asks this module, per site, whether the
recipe is predicted slower than BF16 at the site's shape, and keeps it in high
precision if so (`Fp4Config.cuda_size_policy=False` turns it off).

The policy runs inside a dynamo compile, so it cannot lower or trace a graph.
This module is a closed form of the roofline model
(`fp4compile/inspection/roofline.py`, which walks the graph the CUDA lowering
actually produces): the same kernels, as functions of (M, K, N) and the
config. `tests/test_cuda_policy.py` checks that both agree on the standard
shapes and a grid of others, so a lowering change that changes the graph (and
with it the roofline's plans) fails there until this closed form follows.

What it models: the lowering on a GPU with FP8 tensor cores (H100/H200) at
H200 rates, bf16 activations and weights, no bias; the recipes whose lowering
the roofline covers: both operands quantized with row scales, E5M2 gradients,
row-scope OCC. For any other config `predicted_ratio` returns None and the
policy does not apply. For OCC compensation the share of residual entries
inside the channel set (`coverage`) is data-dependent with
`cuda_compensation="channels"`; the policy uses coverage 1, the model's
cheapest case, so a site it keeps is slower than BF16 whatever the data, while
a quantized site can still be slower at lower coverage (docs/cuda.md). The
default, `"fp8_folded"`, folds the compensation into the activation codes: its
cost does not depend on the data.
"""
from __future__ import annotations

import math

# The roofline model's H200 rates (inspection/roofline.py states their sources;
# tests/test_cuda_policy.py pins them equal): dense BF16 and FP8 matrix rates,
# device-to-device copy bandwidth (bytes read + written).
H200_RATES = {"bf16": 790e12, "fp8": 1580e12, "fp32": 67e12, "copy": 4.3e12}

# Tokens assumed when the activation's token count is symbolic and has no hint.
DEFAULT_TOKENS = 4096
# The break-even search (smallest M at which the recipe reaches BF16) stops here.
MAX_BREAK_EVEN_TOKENS = 1 << 22

BF16, FP8, F32, I64 = 2, 1, 4, 8


def _gemm(m, n, k, a_bytes, b_bytes, out_bytes, unit):
    """(bytes, flops, unit) of C[m, n] = A[m, k] @ B[k, n]."""
    return (m * k * a_bytes + k * n * b_bytes + m * n * out_bytes, 2.0 * m * n * k, unit)


def _pass(nbytes):
    return (nbytes, 0.0, "copy")


def bf16_kernels(m, k, n) -> list:
    """The BF16 linear: three bf16 GEMMs."""
    return [_gemm(m, n, k, BF16, BF16, BF16, "bf16"), _gemm(m, k, n, BF16, BF16, BF16, "bf16"),
            _gemm(n, k, m, BF16, BF16, BF16, "bf16")]


def modelled(config) -> bool:
    """Whether the closed form covers this config's CUDA lowering."""
    return (config.weight_fmt is not None and config.act_fmt is not None and config.grad_fmt == "e5m2"
            and config.weight_granularity == "row" and config.act_granularity == "row"
            and (config.occ_alpha is None or config.occ_scope == "row"))


def quantized_kernels(config, m, k, n, coverage: float = 1.0) -> list:
    """(bytes, flops, unit) per kernel of the quantized linear's CUDA lowering, fwd + bwd.

    The same kernels as the roofline's `_PLANS` for the nodes of the lowered
    graph (each line names the plan it mirrors).
    """
    reads = 1 if k <= 1024 else 2  # Inductor's looped row amax re-reads rows longer than 1024
    dge = config.dge_clamp is not None
    folded = (config.occ_alpha is not None and config.occ_compensate
              and getattr(config, "cuda_compensation", "fp8_folded") == "fp8_folded")
    if folded:
        from ..runtime.occ import alpha_fraction, outliers_per_side

        c = outliers_per_side(k, *alpha_fraction(config.occ_alpha))
        # _plan_folded_activation: one Triton pass (x read once, codes + scale written);
        # rows over 16384 first take their thresholds from two top-k passes.
        act = []
        if k > 16384:
            act += [_pass(m * k * BF16 + m * (c + 1) * (F32 + I64))] * 2
        act.append(_pass(m * k * BF16 + (2 * m * F32 if k > 16384 else 0) + m * k * FP8 + m * F32))
    else:
        act = [_pass(reads * m * k * BF16 + m * k * FP8 + m * F32)]  # _plan_quantize_activation
    kernels = act + [
        # _plan_quantize_weight (forward codes, backward dW cast)
        _pass(reads * n * k * BF16 + n * k * FP8 + n * F32),
        _pass(n * k * F32 + (n * k * BF16 if dge else 0) + n * k * BF16),
        # _plan_fp8_gemm: three FP8 GEMMs, E5M2 amax + cast per gradient operand,
        # column-major copies of both FP8 operands, dx float32 -> bf16
        # (_plan_folded_fp8_gemm: dx written in bf16 by its GEMM, no cast pass)
        _gemm(m, n, k, FP8, FP8, BF16, "fp8"),
        _pass(m * n * BF16), _pass(m * n * BF16 + m * n * FP8), _pass(2 * n * k * FP8),
        _gemm(m, k, n, FP8, FP8, BF16 if folded else F32, "fp8"),
        *([] if folded else [_pass(m * k * F32 + m * k * BF16)]),
        _pass(m * n * BF16), _pass(m * n * BF16 + m * n * FP8), _pass(2 * m * k * FP8),
        _gemm(n, k, m, FP8, FP8, F32, "fp8"),
    ]
    if config.occ_alpha is None or folded:
        return kernels
    from ..runtime.occ import alpha_fraction, outliers_per_side
    from .cuda_compensation import channel_cap

    c = outliers_per_side(k, *alpha_fraction(config.occ_alpha))
    entries = m * 2 * c
    # _plan_occ_clamp_triton: x read once; sparse residual (float32 value, int64 index) and 3 row stats written
    kernels.append(_pass(m * k * BF16 + entries * (F32 + I64) + 3 * m * F32))
    if not config.occ_compensate:
        return kernels
    cap = channel_cap(k)
    rest = entries * (1.0 - coverage)
    kernels += [  # _plan_channel_compensate
        _pass(entries * (F32 + I64) + k * F32),
        _pass(entries * (F32 + I64) + m * cap * F32 + m * cap * F32 + m * 2 * cap * BF16),
        _pass(n * k * BF16 + n * k * F32),
        _gemm(m, n, 2 * cap, BF16, BF16, F32, "bf16"),
        _pass(entries * F32 + rest * (I64 + n * F32) + m * n * F32),
        _pass(m * n * BF16 + m * n * BF16),
        _pass(entries * (F32 + I64) + m * F32 + m * 2 * cap * BF16),
        _gemm(n, 2 * cap, m, BF16, BF16, F32, "bf16"),
        _pass(entries * F32 + rest * (I64 + n * BF16 + n * F32) + k * n * F32 + rest * n * F32),
        _pass(2 * n * k * F32 + n * 2 * cap * F32 + n * k * F32),
        # _plan_add: y (bf16) + the two float32 compensation terms, written bf16
        _pass(m * n * (BF16 + 2 * F32) + m * n * BF16),
    ]
    return kernels


def seconds(kernels, rates=H200_RATES) -> float:
    """Sum over kernels of max(bytes / copy rate, FLOPs / matrix rate), as the roofline model."""
    total = 0.0
    for nbytes, flops, unit in kernels:
        memory = nbytes / rates["copy"]
        total += max(memory, flops / rates[unit]) if flops else memory
    return total


def predicted_ratio(config, m, k, n, coverage: float = 1.0, rates=H200_RATES) -> float | None:
    """BF16 time / quantized time of one linear fwd + bwd (> 1: quantized is faster); None if not modelled."""
    if not modelled(config):
        return None
    return seconds(bf16_kernels(m, k, n), rates) / seconds(quantized_kernels(config, m, k, n, coverage), rates)


def break_even_tokens(config, k, n, coverage: float = 1.0) -> int | None:
    """The smallest M from which the recipe is modelled at >= 1x BF16, or None (not up to 2^22 tokens).

    Doubling search, then bisection between the last M below 1x and the first at
    or above (the ratio grows with M over the range searched: the GEMMs scale as
    M*K*N, the passes at most as M*(K + N)).
    """
    if not modelled(config):
        return None
    m = 1
    while predicted_ratio(config, m, k, n, coverage) < 1.0:
        if m >= MAX_BREAK_EVEN_TOKENS:
            return None
        m *= 2
    low, high = m // 2, m  # ratio(low) < 1 <= ratio(high), or high == 1
    if high == 1:
        return 1
    while high - low > 1:
        mid = (low + high) // 2
        if predicted_ratio(config, mid, k, n, coverage) < 1.0:
            low = mid
        else:
            high = mid
    return high


def token_hint(dims) -> tuple[int, bool]:
    """(M, is_hint): the product of the leading activation dims, concrete or from size hints.

    Symbolic sizes are read through their shape environment's hint (the example
    value dynamo traced with), which adds no guard; a size without a hint
    counts as DEFAULT_TOKENS in total.
    """
    m, symbolic = 1, False
    for d in dims:
        if isinstance(d, int):
            m *= d
            continue
        symbolic = True
        hint = _size_hint(d)
        if hint is None:
            return DEFAULT_TOKENS, True
        m *= hint
    return m, symbolic


def _size_hint(d) -> int | None:
    node = getattr(d, "node", None)
    if node is None:
        return None
    hint = getattr(node, "hint", None)
    if hint is None:
        shape_env = getattr(node, "shape_env", None)
        if shape_env is not None:
            try:
                hint = shape_env.size_hint(node.expr, allow_none=True)
            except Exception:  # no hint can be derived: the caller uses the default
                hint = None
    try:
        return int(hint) if hint is not None else None
    except (TypeError, ValueError):
        return None


def size_policy_reason(config, dims, k: int, n: int) -> str:
    """The reason to keep a site of activation leading dims `dims` and weight [n, k] in BF16, or ""."""
    m, is_hint = token_hint(dims)
    ratio = predicted_ratio(config, m, k, n)
    if ratio is None or ratio >= 1.0:
        return ""
    even = break_even_tokens(config, k, n)
    where = f"break-even at M >= {even} tokens" if even is not None else \
        f"no break-even up to M = {MAX_BREAK_EVEN_TOKENS} tokens"
    m_text = f"M={m} (size hint)" if is_hint else f"M={m}"
    return (f"CUDA size policy: modelled {_floor2(ratio):.2f}x of BF16 at {m_text}, K={k}, N={n} "
            f"({where}; cuda_size_policy=False quantizes it)")


def _floor2(x: float) -> float:
    # Round down so a ratio just under 1 never prints as "1.00x".
    return math.floor(x * 100) / 100
