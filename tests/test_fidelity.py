"""The shape of the paper's OCC fidelity table on a synthetic outlier activation."""
import torch

from fp4compile import fake_quantize, occ_clamp
from fp4compile.runtime.fidelity import format_occ_table, occ_study, synthetic_activation


def _metrics(x, x_hat):
    a, b = x.double().flatten(), x_hat.double().flatten()
    mse = ((a - b) ** 2).mean().item()
    cos = (a @ b / (a.norm() * b.norm())).item()
    snr = 10 * torch.log10((a ** 2).sum() / ((a - b) ** 2).sum()).item()
    return cos, mse, snr


def test_fidelity_improves_monotonically_like_the_paper():
    x = synthetic_activation()
    rows = occ_study(x)
    print("\n" + format_occ_table(rows))
    for prev, nxt in zip(rows, rows[1:]):
        assert nxt["cos"] > prev["cos"], (prev["setting"], nxt["setting"])
        assert nxt["mse"] < prev["mse"]
        assert nxt["snr_db"] > prev["snr_db"]
    # Metrics recomputed independently for two rows.
    cos, mse, snr = _metrics(x, fake_quantize(x))
    assert abs(cos - rows[0]["cos"]) < 1e-12 and abs(mse - rows[0]["mse"]) < 1e-12 and abs(snr - rows[0]["snr_db"]) < 1e-9
    c, r = occ_clamp(x, alpha=0.99)
    cos, mse, snr = _metrics(x, fake_quantize(c) + r)
    assert abs(snr - rows[3]["snr_db"]) < 1e-9
