"""Options reach the backend the same way by every route, and every bad one fails catchably.

Routes: `torch.compile(..., options=)`, `fp4compile.compile_model(...)`, the
`FP4COMPILE_OPTIONS` environment variable. A bad value of each `Fp4Config`
field raises `fp4compile.Fp4OptionsError` (a ValueError) naming the field,
through `torch.compile` itself (not wrapped in dynamo's BackendCompilerFailed)
and eagerly from `compile_model`. Then the per-layer policy: `filter_fn`,
`keep_first_last`, `keep_modules`, and regional compilation.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile import Fp4Config, Fp4OptionsError

from .toy_models import NanoGPT

# One bad value per field, and what the message must say.
BAD_FIELD_VALUES = {
    "recipe": ("fp3", r"recipe='fp3' does not exist; valid recipes: paper"),
    "weight_fmt": ("e3m2", r"weight_fmt='e3m2' is invalid; valid values: 'e2m1', 'e4m3'"),
    "weight_granularity": ("col", r"weight_granularity='col' is invalid; valid values: 'row'"),
    "act_fmt": ("int4", r"act_fmt='int4' is invalid"),
    "act_granularity": ("block8", r"act_granularity='block8' is invalid"),
    "grad_fmt": ("e4m3", r"grad_fmt='e4m3' is invalid; valid values: 'e5m2', 'e2m1', None"),
    "grad_granularity": ("row", r"grad_granularity='row' is invalid; valid values: 'tensor', 'block16', 'block32'"),
    "grad_rounding": ("up", r"grad_rounding='up' is invalid; valid values: 'nearest', 'stochastic'"),
    "hadamard": (64, r"hadamard=64 is invalid; valid values: 0, 16, 32"),
    "hadamard_seed": (-2, r"hadamard_seed=-2 is invalid: an integer >= 0"),
    "cuda_compensation": ("sparse", r"cuda_compensation='sparse' is invalid; valid values: 'fp8_folded', 'channels'"),
    "dge_k": (1.0, r"dge_k=1\.0 is invalid: it must be a number > 1"),
    "dge_clamp": (-3.0, r"dge_clamp=-3\.0 is invalid"),
    "occ_alpha": (1.5, r"occ_alpha=1\.5 is invalid: it must lie in \(0\.5, 1\)"),
    "occ_scope": ("column", r"occ_scope='column' is invalid; valid values: 'row', 'tensor'"),
    "occ_compensate": ("yes", r"occ_compensate='yes' is invalid: True or False"),
    "skip": (("nomodule.*",), r"skip pattern 'nomodule\.\*' matches no module"),
    "keep_modules": ((("h.0.c_fc",),), r"keep_modules=.* is invalid: a tuple of \(module path, reason\)"),
    "filter_fn": ("c_fc", r"filter_fn='c_fc' is invalid: a callable"),
    "keep_first_last": (-1, r"keep_first_last=-1 is invalid: an integer >= 0"),
    "min_features": (2.5, r"min_features=2\.5 is invalid: an integer >= 0"),
    "target": ("tpu", r"target='tpu' is invalid; valid values: 'auto', 'cpu', 'cuda'"),
    "stats_interval": (-1, r"stats_interval=-1 is invalid: an integer >= 0"),
    "cuda_size_policy": ("yes", r"cuda_size_policy='yes' is invalid: True or False"),
}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(fp4compile.OPTIONS_ENV, raising=False)
    fp4compile.reset()
    yield
    fp4compile.reset()


def test_every_field_has_a_bad_value_case():
    assert set(BAD_FIELD_VALUES) == {f.name for f in dataclasses.fields(Fp4Config)}


@pytest.mark.parametrize("field", sorted(BAD_FIELD_VALUES))
def test_bad_value_of_each_field_raises_fp4_options_error_through_torch_compile(field):
    value, message = BAD_FIELD_VALUES[field]
    model = NanoGPT(n_layer=2)
    compiled = torch.compile(model, backend="fp4", options={field: value})
    with pytest.raises(Fp4OptionsError, match=message) as caught:
        compiled(torch.randint(0, 64, (1, 8)))
    assert type(caught.value) is Fp4OptionsError and isinstance(caught.value, ValueError)
    assert fp4compile.reports() == []  # nothing was passed, lowered or compiled
    with pytest.raises(Fp4OptionsError, match=message):  # the one call raises at once
        fp4compile.compile_model(NanoGPT(n_layer=2), **{field: value})


def test_filter_fn_errors_name_the_module():
    model = NanoGPT(n_layer=2)
    compiled = torch.compile(model, backend="fp4_eager", options={"filter_fn": lambda m, fqn: "yes"})
    with pytest.raises(Fp4OptionsError, match=r"filter_fn returned 'yes' for module 'h\.0\.attn\.c_attn'"):
        compiled(torch.randint(0, 64, (1, 8)))


def test_keep_first_last_needs_the_blocks():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))  # children of different classes
    with pytest.raises(Fp4OptionsError, match="keep_first_last=1 needs the whole model"):
        torch.compile(mlp, backend="fp4_eager", options={"keep_first_last": 1})(torch.randn(2, 16))


# ---- the environment variable -----------------------------------------------------


def test_env_options_reach_the_same_config_as_options(monkeypatch):
    options = {"recipe": "fp4-direct", "min_features": 8, "skip": ["lm_head"]}
    idx = torch.randint(0, 64, (1, 8))
    tiny = lambda: NanoGPT(d=16, n_layer=1)  # noqa: E731
    torch.compile(tiny(), backend="fp4_eager", options=options)(idx)
    monkeypatch.setenv(fp4compile.OPTIONS_ENV, json.dumps(options))
    torch.compile(tiny(), backend="fp4_eager")(idx)
    with torch.no_grad():  # an inference graph is enough to read the config: a smaller Inductor compile
        fp4compile.compile_model(tiny(), options=options, regional=False)(idx)
    configs = [r.config for r in fp4compile.reports()]
    assert len(configs) == 3
    assert configs[0] == configs[1] == configs[2] == Fp4Config.from_options(options)
    assert configs[0].recipe == "fp4-direct" and configs[0] != Fp4Config()


def test_explicit_options_win_over_the_env(monkeypatch):
    monkeypatch.setenv(fp4compile.OPTIONS_ENV, '{"recipe": "bf16"}')
    torch.compile(NanoGPT(), backend="fp4_eager", options={"recipe": "fp8"})(torch.randint(0, 64, (1, 8)))
    assert fp4compile.reports()[0].config.recipe == "fp8"


@pytest.mark.parametrize("text, message", [
    ("{recipe: paper}", "FP4COMPILE_OPTIONS is not valid JSON"),
    ('["paper"]', "FP4COMPILE_OPTIONS must be a JSON object"),
    ('{"occ_alpha": 2}', r"occ_alpha=2 is invalid.*\(from FP4COMPILE_OPTIONS\)"),
    ('{"colour": "red"}', r"unknown option\(s\) 'colour'.*\(from FP4COMPILE_OPTIONS\)"),
])
def test_bad_env_options_name_the_variable(monkeypatch, text, message):
    monkeypatch.setenv(fp4compile.OPTIONS_ENV, text)
    with pytest.raises(Fp4OptionsError, match=message):
        torch.compile(NanoGPT(), backend="fp4_eager")(torch.randint(0, 64, (1, 8)))


# ---- per-layer policy -------------------------------------------------------------


def _decisions():
    return {s.module_path: s.reason for r in fp4compile.reports() for s in r.sites}


def test_filter_fn_and_keep_first_last_in_a_whole_model_compile():
    seen = []

    def only_attention(module, fqn):
        seen.append((type(module).__name__, fqn))
        return ".attn." in f".{fqn}."

    model = NanoGPT(n_layer=4)
    torch.compile(model, backend="fp4_eager", options={"filter_fn": only_attention, "keep_first_last": 1})(
        torch.randint(0, 64, (1, 8)))
    decisions = _decisions()
    assert ("Linear", "h.1.c_fc") in seen  # the module object itself, with its full path
    assert decisions["h.1.c_fc"] == "filter_fn returned False"
    assert decisions["h.1.attn.c_attn"] == "" and decisions["h.2.attn.c_proj"] == ""
    assert decisions["h.0.attn.c_attn"] == "keep_first_last=1 (block 0 of 4)"
    assert decisions["h.3.attn.c_proj"] == "keep_first_last=1 (block 3 of 4)"
    assert decisions["lm_head"] == "skip list (lm_head)"


def test_keep_modules_reports_the_given_reason():
    torch.compile(NanoGPT(), backend="fp4_eager", options={"keep_modules": [["h.1.c_proj", "sensitive layer"]]})(
        torch.randint(0, 64, (1, 8)))
    decisions = _decisions()
    assert decisions["h.1.c_proj"] == "sensitive layer" and decisions["h.0.c_proj"] == ""


def test_compile_model_keeps_class_and_signature_and_regional_reuses_one_graph_per_policy():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 8))
    model = NanoGPT(n_layer=4)
    same = fp4compile.compile_model(model, "paper", regional=True, keep_first_last=1,
                                    filter_fn=lambda m, fqn: not fqn.endswith("attn.c_proj"))
    assert same is model and type(model) is NanoGPT
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in model.h)
    model(idx)
    reports = fp4compile.reports()
    # Blocks 0 and 3 share one graph (all kept), blocks 1 and 2 another: two compiles, not four.
    assert len(reports) == 2
    kept, quantized = sorted(reports, key=lambda r: len(r.quantized))
    kept_reason = "keep_first_last=1 (the first and last 1 of 4 blocks)"
    assert {s.module_path: s.reason for s in kept.sites} == {  # filter_fn is checked before keep_first_last
        "attn.c_attn": kept_reason, "attn.c_proj": "filter_fn returned False", "c_fc": kept_reason,
        "c_proj": kept_reason}
    assert {s.module_path: s.reason for s in quantized.sites} == {
        "attn.c_attn": "", "attn.c_proj": "filter_fn returned False", "c_fc": "", "c_proj": ""}
    assert state_dict_keys_unchanged(model)


def state_dict_keys_unchanged(model):
    return list(model.state_dict()) == list(NanoGPT(n_layer=4).state_dict())


def test_regional_needs_repeated_blocks():
    with pytest.raises(Fp4OptionsError, match="regional=True needs repeated blocks"):
        fp4compile.compile_model(nn.Linear(16, 16), "paper", regional=True)
