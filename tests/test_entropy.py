"""The generalized-Gaussian entropy model and the rANS coding path."""
import numpy as np
import pytest
import scipy.stats
import torch

from hpcm_triton.entropy import CdfTables, DecodeSession, GeneralizedGaussian, BitstreamError, default_scale_table, encode
from hpcm_triton.models import TINY
from hpcm_triton import get_model


@pytest.fixture(scope="module")
def ggm():
    return GeneralizedGaussian()


def test_cdf_matches_scipy(ggm):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    ref = scipy.stats.gennorm.cdf(x.numpy(), 1.5)
    np.testing.assert_allclose(ggm.cdf(x).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_cdf_gradient_is_the_density(ggm):
    x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    ggm.cdf(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), scipy.stats.gennorm.pdf(x.detach().numpy(), 1.5), rtol=1e-9)


def test_likelihoods_sum_to_one_and_are_bounded(ggm):
    q = torch.arange(-400, 401, dtype=torch.float64)[:, None]
    scales = torch.tensor([0.01, 0.12, 1.0, 7.5, 60.0]).double()  # 0.12 as the float32 bound stores it
    p = ggm(q, scales)
    assert torch.allclose(p.sum(0), torch.ones(5, dtype=torch.float64), atol=1e-6)
    # scales below 0.12 are raised to it; likelihoods never fall below 1e-9
    assert torch.equal(p[:, 0], p[:, 1]) and p.min() == torch.tensor(1e-9).item()  # float32 bound


def test_quantized_cdfs_are_valid(ggm):
    cdf, length, offset = ggm.quantized_cdfs(default_scale_table())
    assert cdf.shape[0] == 60 and cdf.dtype == torch.int32
    for row, n, off in zip(cdf, length, offset):
        r = row[:n]
        assert r[0] == 0 and r[-1] == 1 << 16 and (r[1:] > r[:-1]).all()  # every symbol codable
        assert n == 2 * (-off) + 3  # symmetric support plus the escape symbol and the end
    assert (length[1:] >= length[:-1]).all()  # wider tables for larger scales


def test_rate_of_model_distributed_data_is_within_one_percent(ggm):
    """Symbols that follow the predicted distributions cost what the likelihoods say (≤ 1 %)."""
    rng = np.random.default_rng(0)
    m = get_model("hpcm-base", **TINY).eval()
    m.update()
    n = 200_000
    scales = torch.from_numpy(np.exp(rng.uniform(np.log(0.3), np.log(30), n))).float()
    # draw integer symbols from the discretized generalized Gaussian of each scale
    q = np.round(scipy.stats.gennorm.rvs(1.5, scale=scales.numpy(), random_state=rng)).astype(np.int32)
    est_bits = float(-torch.log2(ggm(torch.from_numpy(q).float(), scales)).sum())
    idx = m._y_indexes(scales).numpy()
    stream = encode([(q, idx, m._cdf_tables()["y"])])
    assert abs(8 * len(stream) / est_bits - 1) < 0.01
    with DecodeSession([stream], m._cdf_tables(), label="y") as s:
        assert np.array_equal(s.decode(0, "y", idx), q)
        s.verify()


def test_out_of_table_symbols_are_coded_exactly():
    m = get_model("hpcm-base", **TINY).eval()
    m.update()
    q = np.array([0, 1, -1, 5000, -70000, 2**20, 3], dtype=np.int32)
    idx = np.zeros_like(q)  # the narrowest table: almost everything escapes through bypass coding
    stream = encode([(q, idx, m._cdf_tables()["y"])])
    with DecodeSession([stream], m._cdf_tables()) as s:
        assert np.array_equal(s.decode(0, "y", idx), q)
        s.verify()


def test_decode_session_rejects_non_streams():
    t = {"y": CdfTables([[0, 1 << 16]], [2], [0])}
    for bad in [b"", b"abc", b"\x00" * 7, "text"]:
        with pytest.raises(BitstreamError):
            DecodeSession([bad], t)
