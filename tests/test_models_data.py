"""The benchmark model and data: shapes, parameter layout, determinism of the data stream."""

from __future__ import annotations

import math

import pytest
import torch

from fp4compile.training.data import (
    BatchSampler,
    default_corpus_files,
    load_corpus,
    split_train_val,
    val_batches,
)
from fp4compile.training.models import PRESETS, Llama, LlamaConfig, param_count, preset
from fp4compile.training import build_model


def expected_param_count(config: LlamaConfig) -> int:
    d, f, v, n = config.dim, config.ffn_dim, config.vocab_size, config.n_layers
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # q/k/v/o, gate/up/down, two norm gains
    return 2 * v * d + n * per_layer + d  # embedding + lm_head (untied), layers, final norm


def meta_model(config: LlamaConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config)


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return load_corpus(max_bytes=200_000)


# ---------------------------------------------------------------- model


def test_tiny_forward_shape_and_param_count():
    config = preset("tiny")
    model = build_model(config, seed=0)
    idx = torch.randint(0, 256, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 256)
    assert logits.dtype == torch.float32
    assert param_count(model) == expected_param_count(config)
    assert param_count(model, exclude_embeddings=True) == expected_param_count(config) - 256 * config.dim


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_and_alignment(name):
    config = preset(name)
    assert param_count(meta_model(config)) == expected_param_count(config)
    multiple = 128 if name.startswith("gpu") else 16
    assert config.dim % multiple == 0 and config.ffn_dim % multiple == 0


def test_preset_sizes():
    counts = {name: param_count(meta_model(config)) for name, config in PRESETS.items()}
    assert 1e6 < counts["cpu"] < 10e6
    assert counts["cpu-small"] < counts["cpu"] < counts["cpu-large"] < counts["gpu-125m"] < counts["gpu-350m"] < counts["gpu-1b"]
    assert 0.9e9 < counts["gpu-1b"] < 1.5e9
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpu-70b")


def test_cpu_small_default_length_is_compute_optimal():
    """The cpu-small preset's default run is the 20-tokens-per-parameter point of the training benchmark."""
    from fp4compile.training.bench import PRESET_TRAINING

    defaults = PRESET_TRAINING["cpu-small"]
    tokens = defaults.steps * defaults.batch_size * defaults.seq_len
    tokens_per_param = tokens / param_count(meta_model(preset("cpu-small")))
    assert 19.5 <= tokens_per_param <= 20.5, tokens_per_param


def test_module_names_are_the_ones_the_passes_match():
    model = build_model(preset("tiny"), seed=0)
    assert isinstance(model.embed, torch.nn.Embedding)
    assert isinstance(model.lm_head, torch.nn.Linear)
    block = model.layers[0]
    for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                   block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
        assert isinstance(linear, torch.nn.Linear) and linear.bias is None
    assert hasattr(block, "attn_norm") and hasattr(block, "mlp_norm") and hasattr(model, "norm")


def test_state_dict_holds_only_parameters():
    model = build_model(preset("tiny"), seed=0)
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    # the rotary tables and the mask are still there, as non-persistent buffers
    assert {"rope_cos", "rope_sin", "causal_mask"} <= {name for name, _ in model.named_buffers()}


def test_same_seed_same_init_and_residual_scaling():
    a = build_model(preset("tiny"), seed=3)
    b = build_model(preset("tiny"), seed=3)
    c = build_model(preset("tiny"), seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)

    config = preset("cpu")  # big enough matrices for a tight std estimate
    model = build_model(config, seed=0)
    layer = model.layers[0]
    assert layer.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    assert layer.attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert torch.equal(layer.attn_norm.weight, torch.ones(config.dim))


def test_attention_is_causal():
    model = build_model(preset("tiny"), seed=0)
    idx = torch.randint(0, 256, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    with torch.no_grad():
        assert torch.equal(model(idx)[:, :12], model(changed)[:, :12])
        assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_rmsnorm_and_softmax_keep_autocast_dtype():
    model = build_model(preset("tiny"), seed=0)
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert model.norm(x).dtype == torch.bfloat16


def test_compiles_with_dynamic_sequence_length():
    torch._dynamo.reset()
    model = build_model(preset("tiny"), seed=0)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    with torch.no_grad():
        for seq in (5, 23, 64):
            idx = torch.randint(0, 256, (2, seq))
            torch.testing.assert_close(compiled(idx), model(idx))
    torch._dynamo.reset()


# ---------------------------------------------------------------- data


def test_default_corpus_is_stdlib_source_without_tests():
    files = default_corpus_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    data = load_corpus(max_bytes=50_000)
    assert data.dtype == torch.uint8 and data.shape == (50_000,)
    assert torch.equal(data, load_corpus(max_bytes=50_000))  # deterministic


def test_load_corpus_from_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes(b"world")
    (tmp_path / "a.txt").write_bytes(b"hello ")
    (tmp_path / ".hidden").write_bytes(b"secret")
    assert bytes(load_corpus(tmp_path).tolist()) == b"hello world"
    assert bytes(load_corpus(tmp_path / "a.txt").tolist()) == b"hello "
    assert bytes(load_corpus(tmp_path, max_bytes=8).tolist()) == b"hello wo"
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")


def test_split_is_a_contiguous_tail(corpus):
    train, val = split_train_val(corpus, 0.1)
    assert len(val) == 20_000 and len(train) + len(val) == len(corpus)
    assert torch.equal(torch.cat([train, val]), corpus)


def test_batches_are_deterministic_per_seed(corpus):
    first = BatchSampler(corpus, batch_size=4, seq_len=32, seed=7)
    second = BatchSampler(corpus, batch_size=4, seq_len=32, seed=7)
    other = BatchSampler(corpus, batch_size=4, seq_len=32, seed=8)
    for _ in range(3):
        (x1, y1), (x2, y2), (x3, _) = first.next_batch(), second.next_batch(), other.next_batch()
        assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert not torch.equal(x1, x3)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


def test_sampler_state_restores_the_stream(corpus):
    sampler = BatchSampler(corpus, batch_size=4, seq_len=32, seed=0)
    sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(2)]
    restored = BatchSampler(corpus, batch_size=4, seq_len=32, seed=123)
    restored.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [restored.next_batch() for _ in range(2)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert restored.batches_drawn == 3


def test_val_set_size_and_disjoint_windows():
    # random bytes: every 65-byte window occurs once, so a window's content locates it
    val = torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    batches = val_batches(val, batch_size=16, seq_len=64, n_sequences=300)
    assert sum(len(x) for x, _ in batches) == 300
    assert [len(x) for x, _ in batches] == [16] * 18 + [12]
    # locate every window in the data by its first 8 bytes and check no two share a byte
    raw = bytes(val.tolist())
    position_of_prefix = {raw[i : i + 8]: i for i in range(len(raw) - 8)}
    windows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])
    starts = []
    for window in windows:
        window_bytes = bytes(window.tolist())
        start = position_of_prefix[window_bytes[:8]]
        assert raw[start : start + 65] == window_bytes
        starts.append(start)
    starts.sort()
    assert all(b - a >= 65 for a, b in zip(starts, starts[1:]))
    assert starts[-1] > len(val) // 2  # spread over the whole validation split
    assert torch.equal(batches[0][0], val_batches(val, 16, 64, 300)[0][0])
    with pytest.raises(ValueError, match="disjoint windows"):
        val_batches(val, batch_size=16, seq_len=64, n_sequences=1000)
