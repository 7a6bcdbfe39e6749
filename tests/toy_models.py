"""Small hand-written models covering every matmul form the pass must find."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AllForms(nn.Module):
    """One site per supported form, plus two activation x activation products."""

    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)  # torch._C._nn.linear
        self.w_t = nn.Parameter(torch.randn(d, d) / math.sqrt(d))  # x @ W.t()
        self.w_T = nn.Parameter(torch.randn(d, d) / math.sqrt(d))  # torch.matmul(x, W.T)
        self.conv1d_w = nn.Parameter(torch.randn(d, 2 * d) / math.sqrt(d))  # addmm(b, x, W) [in, out]
        self.conv1d_b = nn.Parameter(torch.zeros(2 * d))
        self.w_io = nn.Parameter(torch.randn(2 * d, d) / math.sqrt(d))  # x @ W with W [in, out]
        self.fn_w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))  # F.linear without bias

    def forward(self, x):
        h = self.lin(x)
        h = h @ self.w_t.t()
        h = torch.matmul(h, self.w_T.T)
        scores = h @ h.transpose(-2, -1)  # activation x activation
        h = torch.softmax(scores, -1) @ h  # activation x activation
        flat = h.reshape(-1, h.shape[-1])
        flat = torch.addmm(self.conv1d_b, flat, self.conv1d_w)
        h = flat.reshape(*h.shape[:-1], -1) @ self.w_io
        return F.linear(torch.relu(h), self.fn_w)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head = n_head

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's structure at toy size (untied lm_head so the skip list shows)."""

    def __init__(self, vocab=64, d=32, n_layer=2, n_head=2, block=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList([Block(d, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ReferenceLinear(nn.Module):
    """An nn.Linear whose forward is fp4_linear_reference (for eager comparisons)."""

    def __init__(self, linear: nn.Linear, config):
        super().__init__()
        self.weight, self.bias, self.config = linear.weight, linear.bias, config

    def forward(self, x):
        from fp4compile import fp4_linear_reference

        return fp4_linear_reference(x, self.weight, self.bias, self.config)


def with_reference_linears(model: nn.Module, config, skip=("lm_head",)) -> nn.Module:
    """Swap every nn.Linear not named in `skip` for a ReferenceLinear sharing its parameters."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, ReferenceLinear(child, config))
    return model
