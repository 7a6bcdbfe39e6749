"""Tests of the theoretical FLOP cost model (fp4compile.inspection.cost_model).

Counting assumptions the figures below rest on (see the module docstring):

* per token and layer, BF16 costs ``24 h^2`` (linear GEMMs) ``+ 5 s h``
  (attention products and score-side softmax work) ``+ 36 h`` (other
  elementwise work); only the linear GEMMs speed up, by ``gemm_speedup``;
* OCC adds a compensation GEMM doing ``2 (1 - alpha)`` of the dense GEMM's
  FLOPs, in FP8 (2x BF16) at half the dense rate for a sparse operand, i.e. at
  the BF16 rate: ``+ 0.48 h^2`` per token at ``alpha = 0.99`` -> 2.95;
* DGE costs 8 FLOPs per weight element per backward call, shared over the
  micro-batch's tokens.
"""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp4compile.inspection.cost_model import (
    HIDDEN,
    SEQ,
    graph_cost,
    llama_layer_cost,
    name_input_dims,
    paper_speedup_expr,
    speedup,
)

# ---------------------------------------------------------------------------
# Layer model: the paper's figures at h = 4096, s = 2048
# ---------------------------------------------------------------------------


def test_layer_terms_sum_to_the_papers_count():
    layer = llama_layer_cost()
    h, s = HIDDEN, SEQ
    assert sympy.expand(layer.total - (24 * h**2 + 5 * s * h + 36 * h)) == 0
    assert sympy.expand(layer.linear_gemm - 24 * h**2) == 0
    assert sympy.expand(layer.weight_elements - 12 * h**2) == 0


def test_native_fp4_speedup_is_3_12_and_matches_the_papers_expression():
    result = speedup(4096, 2048, gemm_speedup=4)
    assert round(result.value, 2) == 3.12
    paper = (24 * HIDDEN + 5 * SEQ + 36) / (6 * HIDDEN + 5 * SEQ + 36)
    assert sympy.simplify(result.expr - paper) == 0
    assert sympy.simplify(result.expr - paper_speedup_expr(4)) == 0


def test_fp4_on_fp8_tensor_cores_is_1_83():
    result = speedup(4096, 2048, gemm_speedup=2)
    assert round(result.value, 2) == 1.83
    paper = (24 * HIDDEN + 5 * SEQ + 36) / (12 * HIDDEN + 5 * SEQ + 36)
    assert sympy.simplify(result.expr - paper) == 0


def test_occ_at_alpha_0_99_lowers_native_fp4_to_2_95():
    result = speedup(4096, 2048, gemm_speedup=4, occ_alpha=0.99)
    assert round(result.value, 2) == 2.95
    # Compensation: 2(1 - alpha) = 2% of the 24h linear-GEMM FLOPs, at the BF16 rate.
    expected = (24 * HIDDEN + 5 * SEQ + 36) / (6 * HIDDEN + 5 * SEQ + 36 + sympy.Rational(48, 100) * HIDDEN)
    assert sympy.simplify(result.expr - expected) == 0


def test_dge_is_negligible_once_shared_over_a_few_sequences():
    # 8 FLOPs x 12 h^2 weights once per backward call: 192 FLOPs/h per token for
    # a single 2048-token sequence, a twentieth of that for 16 sequences.
    one_sequence = speedup(4096, 2048, occ_alpha=0.99, dge=True)
    sixteen = speedup(4096, 2048, occ_alpha=0.99, dge=True, tokens_per_batch=16 * 2048)
    assert round(one_sequence.value, 2) == 2.93
    assert round(sixteen.value, 2) == 2.95
    assert SEQ in one_sequence.expr.free_symbols


def test_overheads_only_lower_the_speedup():
    plain = speedup(occ_alpha=0.99).value
    with_everything = speedup(occ_alpha=0.99, dge=True, quantization=True).value
    assert 1 < with_everything < plain < speedup().value < 4


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        speedup(occ_alpha=1.0)
    with pytest.raises(ValueError):
        speedup(gemm_speedup=0)


# ---------------------------------------------------------------------------
# Graph model on dynamo-captured graphs with dynamic shapes
# ---------------------------------------------------------------------------


def _capture(model: nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    """The single graph dynamo captures from ``model(*inputs)``, with dynamic shapes."""
    captured: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=True)(*inputs)
    assert len(captured) == 1, "expected one graph, no graph breaks"
    return captured[0]


class TwoLayerMLP(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TinyAttentionBlock(nn.Module):
    """Pre-norm attention + MLP block (one head) with the paper's 4h MLP."""

    def __init__(self, h: int = 16):
        super().__init__()
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.norm2 = nn.LayerNorm(h)
        self.up = nn.Linear(h, 4 * h, bias=False)
        self.down = nn.Linear(4 * h, h, bias=False)
        self.scale = h**-0.5

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        x = x + self.proj(torch.matmul(attn, v))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def _linear_sites(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]


# Distinct example sizes, neither 0 nor 1, so that dynamo neither merges nor specializes them.
BATCH, SEQ_LEN = 3, 7


def test_mlp_linear_site_flops_are_2_b_s_k_n_symbolically():
    gm = _capture(TwoLayerMLP(), torch.randn(BATCH, SEQ_LEN, 16))
    names = name_input_dims(gm, "l_x_", ["b", "s"])
    assert sorted(names.values()) == ["b", "s"]
    fc1, fc2 = _linear_sites(gm)
    cost = graph_cost(gm, {fc1: True, fc2: True}, names)

    b, s = sympy.symbols("b s", positive=True, integer=True)
    by_name = {site.name: site for site in cost.sites}
    assert sympy.expand(by_name[fc1].forward_flops - 2 * b * s * 16 * 32) == 0
    assert sympy.expand(by_name[fc2].forward_flops - 2 * b * s * 32 * 8) == 0
    assert sympy.expand(by_name[fc1].training_flops - 3 * 2 * b * s * 16 * 32) == 0
    assert (by_name[fc1].m, by_name[fc1].k, by_name[fc1].n) == (b * s, 16, 32)
    assert cost.example_values == {b: BATCH, s: SEQ_LEN}
    assert cost.evaluate(by_name[fc1].forward_flops) == 2 * BATCH * SEQ_LEN * 16 * 32

    # Rest of the graph: two bias adds and the relu, one FLOP per output element.
    assert sympy.expand(cost.other_forward_flops - b * s * (32 + 8 + 32)) == 0
    assert 1 < cost.speedup_value < 4
    assert cost.speedup_expr.free_symbols <= {b, s}


def test_attention_block_counts_and_speedup_bounds():
    h = 16
    gm = _capture(TinyAttentionBlock(h), torch.randn(BATCH, SEQ_LEN, h))
    names = name_input_dims(gm, "l_x_", ["b", "s"])
    linears = _linear_sites(gm)
    assert len(linears) == 4
    cost = graph_cost(gm, {name: True for name in linears}, names)

    b, s = sympy.symbols("b s", positive=True, integer=True)
    quantized = [site for site in cost.sites if site.quantized]
    attention = [site for site in cost.sites if not site.quantized]
    # The layer model's 24 h^2 per token, here for b*s tokens.
    assert sympy.expand(sum(site.forward_flops for site in quantized) - 24 * h**2 * b * s) == 0
    # QK^T and PV: 2 s h each per token, over the full score matrix.
    assert len(attention) == 2
    assert sympy.expand(sum(site.forward_flops for site in attention) - 4 * s * h * b * s) == 0

    # FP4 helps, but never by more than the GEMM throughput factor.
    for gemm_speedup in (4, 2):
        full = graph_cost(gm, {name: True for name in linears}, names, gemm_speedup=gemm_speedup)
        bare = graph_cost(
            gm, {name: True for name in linears}, names, gemm_speedup=gemm_speedup,
            occ_alpha=None, dge=False, quantization_overhead=False,
        )
        assert 1 < full.speedup_value < bare.speedup_value < gemm_speedup
        assert 1 < full.forward_speedup_value < gemm_speedup

    # Nothing quantized: no speedup and no overhead.
    none = graph_cost(gm, {}, names)
    assert none.speedup_expr == 1
    assert none.overhead_forward == {} and none.overhead_backward == {}

    table = cost.table()
    for name in linears:
        assert name in table
    assert "OCC compensation GEMM" in table and "DGE" in table and "speedup over BF16" in table


def test_other_matmul_forms_are_sites():
    class Products(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 5))
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x, y):
            flat = torch.addmm(self.bias, x.reshape(-1, 8), self.weight)  # [b*s, 5]
            return flat.sum() + torch.bmm(x, y).sum()  # [b, s, 8] @ [b, 8, 4]

    gm = _capture(Products(), torch.randn(BATCH, SEQ_LEN, 8), torch.randn(BATCH, 8, 4))
    names = name_input_dims(gm, "l_x_", ["b", "s"]) | name_input_dims(gm, "l_y_", [None, None, "n"])
    cost = graph_cost(gm, {}, names)
    b, s, n = sympy.symbols("b s n", positive=True, integer=True)
    flops = {site.op: site.forward_flops for site in cost.sites}
    assert sympy.expand(flops["addmm"] - 2 * b * s * 8 * 5) == 0
    assert sympy.expand(flops["bmm"] - 2 * b * s * 8 * n) == 0
    assert cost.evaluate(flops["bmm"]) == 2 * BATCH * SEQ_LEN * 8 * 4


def test_unknown_site_names_are_rejected():
    gm = _capture(TwoLayerMLP(), torch.randn(BATCH, SEQ_LEN, 16))
    with pytest.raises(ValueError, match="not matmul sites"):
        graph_cost(gm, {"relu": True})
