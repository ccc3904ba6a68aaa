"""The five variants as codecs: architecture, forward, real bitstreams, errors.

The seed's five test modes are here as imports / fusion / arch / forward tests; its "compare"
mode is a benchmark (bench/bench_models.py). Most tests use TINY widths so the suite fits a
2-core CI machine; full-size models run forward once each at 256².
"""
import numpy as np
import pytest
import torch

import hpcm_triton
from hpcm_triton import BitstreamError, get_model, param_groups
from hpcm_triton.entropy import default_scale_table
from hpcm_triton.models import TINY
from hpcm_triton.models.modules import CrossAttentionCell, DWConvSpatialPrior
from hpcm_triton.models.seeded import seeded_init_
from hpcm_triton.rwkv import RWKVContextCell, RWKVFusionNet, RWKVSpatialPrior

VARIANTS = list(hpcm_triton.MODELS)


def tiny(name, seed=0, **kw):
    torch.manual_seed(seed)
    return seeded_init_(get_model(name, **TINY, **kw)).eval()


@pytest.fixture(scope="module")
def chelsea():
    from skimage import data

    return torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float().div(255)[None]  # 300×451


# ---------------------------------------------------------------- imports / arch
def test_public_names():
    for n in ["HPCM_Base", "HPCM_Large", "HPCM_Phase1", "HPCM_Phase2", "HPCM_Phase3", "HPCM_Phase4",
              "get_model", "param_groups", "BitstreamError"]:
        assert hasattr(hpcm_triton, n), n
    with pytest.raises(ValueError, match="unknown model 'phase9'"):
        get_model("phase9")


EXPECTED_ARCH = {  # (attn_s1, attn_s2, attn_s3, context_net, priors) per docs/architecture.md §5
    "hpcm-base": (CrossAttentionCell, CrossAttentionCell, CrossAttentionCell, torch.nn.Conv2d, DWConvSpatialPrior),
    "hpcm-large": (CrossAttentionCell, CrossAttentionCell, CrossAttentionCell, torch.nn.Conv2d, DWConvSpatialPrior),
    "phase1": (CrossAttentionCell, CrossAttentionCell, RWKVContextCell, torch.nn.Conv2d, DWConvSpatialPrior),
    "phase2": (RWKVContextCell, RWKVContextCell, RWKVContextCell, torch.nn.Conv2d, DWConvSpatialPrior),
    "phase3": (RWKVContextCell, RWKVContextCell, RWKVContextCell, RWKVFusionNet, DWConvSpatialPrior),
    "phase4": (RWKVContextCell, RWKVContextCell, RWKVContextCell, RWKVFusionNet, RWKVSpatialPrior),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_arch(name):
    m = get_model(name, **TINY)
    a1, a2, a3, fusion, prior = EXPECTED_ARCH[name]
    assert type(m.attn_s1) is a1 and type(m.attn_s2) is a2 and type(m.attn_s3) is a3
    assert all(type(c) is fusion for c in m.context_net) and len(m.context_net) == 2
    assert type(m.y_spatial_prior_s1_s2) is prior and type(m.y_spatial_prior_s3) is prior
    rates = [c.hidden_rate for c in (m.attn_s1, m.attn_s2, m.attn_s3) if isinstance(c, RWKVContextCell)]
    assert rates == [2, 3, 4][3 - len(rates):]


# Full-size parameter counts, counted by building each variant (Base and Large as published).
FULL_SIZE_PARAMS = {"hpcm-base": 68_505_299, "hpcm-large": 89_718_803, "phase1": 72_672_991, "phase2": 78_550_775,
                    "phase3": 89_300_231, "phase4": 132_043_319}


def _count_on_meta(name, **kw):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        m = get_model(name, **kw)
    return sum(p.numel() for p in m.parameters()), m


def test_full_size_parameter_counts():
    counts = {n: _count_on_meta(n)[0] for n in VARIANTS}
    assert counts == FULL_SIZE_PARAMS
    # Phase 3 adds exactly the two RWKVFusionNets in place of two conv1×1(640, 640).
    fusion = sum(p.numel() for p in RWKVFusionNet(640, num_blocks=1, hidden_rate=4).parameters())
    assert counts["phase3"] - counts["phase2"] == 2 * (fusion - (640 * 640 + 640))


def test_phase4_prior_blocks_are_configurable():
    from hpcm_triton.models.config import FORK_PHASE4, PHASES, HPCMConfig
    from hpcm_triton.rwkv import RWKVFusionBlock

    def blocks(prior):
        return (sum(isinstance(m, RWKVFusionBlock) for m in prior.branch_1),
                sum(isinstance(m, RWKVFusionBlock) for m in prior.branch_2))

    # The seed's Phase 4 builds 2 + 1 RWKV blocks in both priors, and the config says so.
    assert PHASES[4].rwkv_prior_s1_s2_blocks == (2, 1) and PHASES[4].rwkv_prior_s3_blocks == (2, 1)
    seed_count, seed = _count_on_meta("phase4")
    assert blocks(seed.y_spatial_prior_s1_s2) == (2, 1) and blocks(seed.y_spatial_prior_s3) == (2, 1)
    # The public fork's 3 + 2 s3 prior is selectable and is what gets built.
    fork_count, fork = _count_on_meta("phase4", rwkv_prior_s3_blocks=FORK_PHASE4.rwkv_prior_s3_blocks)
    assert blocks(fork.y_spatial_prior_s1_s2) == (2, 1) and blocks(fork.y_spatial_prior_s3) == (3, 2)
    # One RWKVFusionBlock(960, rate 4) has 12,055,688 parameters; the fork's s3 prior adds two.
    assert fork_count - seed_count == 2 * 12_055_688 and fork_count == 156_154_695
    # Training checkpoints saved with the old single field still rebuild the same model.
    assert HPCMConfig.json_fields({"rwkv_prior_blocks": 3})["rwkv_prior_s3_blocks"] == (3, 1)
    with pytest.raises(ValueError, match="rwkv_prior_s3_blocks"):
        HPCMConfig(rwkv_prior_s3_blocks=(3,))


def test_param_groups_follow_the_seed():
    m = get_model("phase3", **TINY)
    groups = {g["name"]: g for g in param_groups(m, lr=1e-4, rwkv_lr=5e-5)}
    assert groups["base"]["lr"] == 1e-4 and groups["rwkv"]["lr"] == 5e-5
    rwkv_ids = {id(p) for p in groups["rwkv"]["params"]}
    for mod in (m.attn_s1, m.attn_s2, m.attn_s3, *m.context_net):
        assert all(id(p) in rwkv_ids for p in mod.parameters())
    assert all(id(p) not in rwkv_ids for p in m.g_a.parameters())
    assert len(rwkv_ids) + len(groups["base"]["params"]) == len(list(m.parameters()))
    assert [g["name"] for g in param_groups(get_model("hpcm-base", **TINY))] == ["base"]


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_full_size_256(name):
    torch.manual_seed(0)
    m = get_model(name).eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x)
    assert set(out) == {"x_hat", "likelihoods"} and set(out["likelihoods"]) == {"y", "z"}
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (1, 320, 16, 16) and out["likelihoods"]["z"].shape == (1, 256, 4, 4)
    for t in (out["x_hat"], *out["likelihoods"].values()):
        assert torch.isfinite(t).all()
    assert ((out["likelihoods"]["y"] > 0) & (out["likelihoods"]["y"] <= 1)).all()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [256, 512])
def test_forward_tiny_train_and_eval(name, size):
    m = tiny(name).train()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    out = m(x)
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (1, TINY["M"], size // 16, size // 16)
    bpp = sum(-l.log2().sum() for l in out["likelihoods"].values()) / (size * size)
    loss = 0.0067 * 255 ** 2 * torch.mean((out["x_hat"] - x) ** 2) + bpp
    loss.backward()
    assert torch.isfinite(loss)
    for name_, p in m.named_parameters():
        if name_.startswith(("g_a.", "h_s.", "attn_s3.", "context_net.0")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name_


def test_use_checkpoint_gives_the_same_gradients():
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        m = tiny("phase4", use_checkpoint=ckpt).train()
        torch.manual_seed(5)  # same additive noise in both runs
        out = m(x)
        (out["x_hat"].square().mean() + sum(l.log2().mean() for l in out["likelihoods"].values())).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------- real bitstreams
@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_real_photo(name, chelsea):
    m = tiny(name)
    m.update()
    with torch.no_grad():
        ref = m(chelsea)
    enc = m.compress(chelsea)
    assert enc["image_size"] == (300, 451)
    dec = m.decompress(enc["strings"], enc["shape"], enc["image_size"])
    assert dec["x_hat"].shape == chelsea.shape
    # The decoder reproduces the eval-mode forward pass exactly, on the same machine.
    assert torch.equal(dec["x_hat"], ref["x_hat"].clamp(0, 1))
    real_bits = sum(8 * len(s[0]) for s in enc["strings"])
    est_bits = sum(float(-l.log2().sum()) for l in ref["likelihoods"].values())
    # Untrained weights code many out-of-table symbols through the bypass path and the streams
    # are small, so rate and estimate only agree loosely here; the 1 % agreement on data that
    # follows the model is tested in test_entropy.py.
    assert abs(real_bits / est_bits - 1) < 0.03


def test_batch_of_two_matches_single_images(chelsea):
    m = tiny("phase2")
    m.update()
    x = torch.cat([chelsea[..., :256, :320], chelsea[..., 40:296, 100:420].flip(-1)])
    enc = m.compress(x)
    assert len(enc["strings"][0]) == len(enc["strings"][1]) == 2
    for b in range(2):
        single = m.compress(x[b:b + 1])
        assert single["strings"][0][0] == enc["strings"][0][b] and single["strings"][1][0] == enc["strings"][1][b]
    dec = m.decompress(enc)
    assert dec["x_hat"].shape == x.shape


def test_update_tables_survive_a_checkpoint(tmp_path, chelsea):
    m = tiny("phase3")
    assert m.update() is True and m.update() is False  # kept unless forced
    assert m.update(force=True) is True
    path = tmp_path / "ckpt.pth"
    torch.save(m.state_dict(), path)
    fresh = get_model("phase3", **TINY).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))  # no "size mismatch"
    assert torch.equal(fresh.quantized_cdf_y, m.quantized_cdf_y)
    x = chelsea[..., :128, :128]
    assert fresh.compress(x)["strings"] == m.compress(x)["strings"]
    assert m.scale_table.shape == (60,) and torch.allclose(m.scale_table, default_scale_table())


def test_phase_from_official_state_dict_reports_new_modules():
    base = tiny("hpcm-base")
    report_model = hpcm_triton.HPCM_Phase3.from_official_state_dict(base.state_dict(), **TINY)
    rep = report_model.load_report
    assert rep["new_modules"] == ["attn_s1", "attn_s2", "attn_s3", "context_net.0", "context_net.1"]
    assert rep["dropped_official_modules"] == ["attn_s1", "attn_s2", "attn_s3", "context_net.0", "context_net.1"]
    for k, v in base.state_dict().items():
        if k.startswith(("g_a", "g_s", "h_a", "h_s", "y_spatial", "adaptive", "means", "scales")):
            assert torch.equal(report_model.state_dict()[k], v), k
    p4 = hpcm_triton.HPCM_Phase4.from_official_state_dict(base.state_dict(), **TINY).load_report
    assert "y_spatial_prior_s3" in p4["new_modules"]
    p1 = hpcm_triton.HPCM_Phase1.from_official_state_dict(base.state_dict(), **TINY).load_report
    assert p1["new_modules"] == ["attn_s3"]


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    m = tiny("hpcm-base")
    m.update()
    good = torch.rand(1, 3, 64, 64)
    for bad, msg in [(torch.rand(1, 1, 64, 64), r"\(B, 3, H, W\)"), (torch.rand(3, 64, 64), r"\(B, 3, H, W\)"),
                     (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"), (torch.rand(1, 3, 32, 64), "at least 64"),
                     (good.clone().index_fill_(2, torch.tensor([3]), float("nan")), "NaN or inf"),
                     (good.clone().index_fill_(3, torch.tensor([5]), float("inf")), "NaN or inf")]:
        with pytest.raises(ValueError, match=msg):
            m.compress(bad)
        with pytest.raises(ValueError, match=msg):
            m(bad)
    fresh = get_model("hpcm-base", **TINY).eval()
    with pytest.raises(RuntimeError, match="update"):
        fresh.compress(good)


@pytest.fixture(scope="module")
def coded():
    m = tiny("phase2")
    m.update()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    return m, m.compress(x)


def _corrupt(s: bytes, pos: int) -> bytes:
    b = bytearray(s)
    b[pos] ^= 0x5A
    return bytes(b)


@pytest.mark.parametrize("what", ["truncated", "truncated_unaligned", "flipped_head", "flipped_middle", "flipped_tail",
                                  "empty", "z_flipped", "other_model", "garbage"])
def test_bad_streams_raise_bitstream_error(coded, what):
    m, enc = coded
    y, z = enc["strings"][0][0], enc["strings"][1][0]
    rng = np.random.default_rng(0)
    if what == "truncated":
        y = y[: len(y) // 2 // 4 * 4]
    elif what == "truncated_unaligned":
        y = y[:-3]
    elif what == "flipped_head":
        y = _corrupt(y, 2)
    elif what == "flipped_middle":
        y = _corrupt(y, len(y) // 2)
    elif what == "flipped_tail":
        y = _corrupt(y, len(y) - 1)
    elif what == "empty":
        y = b""
    elif what == "z_flipped":
        z = _corrupt(z, len(z) // 2)
    elif what == "other_model":
        other = tiny("hpcm-base", seed=1)
        other.update()
        o = other.compress(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(8)))
        y, z = o["strings"][0][0], o["strings"][1][0]
    elif what == "garbage":
        y = rng.integers(0, 256, len(y), dtype=np.uint8).tobytes()
    with pytest.raises(BitstreamError):
        m.decompress([[y], [z]], enc["shape"])


def test_bad_stream_containers(coded):
    m, enc = coded
    y, z = enc["strings"][0][0], enc["strings"][1][0]
    for strings, shape in [([[y], [z, z]], enc["shape"]), ([[y]], enc["shape"]), ([["nope"], [z]], enc["shape"]),
                           ([[y], [z]], (0, 2)), ([[y], [z]], (3, 3)), ([[y], [z]], None)]:
        with pytest.raises(BitstreamError):
            m.decompress(strings, shape)
    with pytest.raises(BitstreamError, match="image_size"):
        m.decompress([[y], [z]], enc["shape"], image_size=(1000, 10))
    assert torch.isfinite(m.decompress([[y], [z]], enc["shape"])["x_hat"]).all()  # the model still works


def test_channels_last_input_codes_like_contiguous(chelsea):
    m = tiny("phase1")
    m.update()
    x = chelsea[..., :200, :300]
    cl = x.contiguous(memory_format=torch.channels_last)
    assert m.compress(cl)["strings"] == m.compress(x)["strings"]
    with torch.no_grad():
        assert torch.equal(m(cl)["x_hat"].clamp(0, 1), m.decompress(m.compress(x))["x_hat"])


# ---------------------------------------------------------------- mask cache
def _mask_sets(C, H, W, device, dtype=torch.float32):
    """Every mask set one schedule run uses, for a y of (1, C, H, W)."""
    from hpcm_triton.models import masks

    return [masks.two_part(1, C, H // 4, W // 4, dtype, device), masks.four_part(1, C, H // 2, W // 2, dtype, device),
            masks.eight_part(1, C, H, W, dtype, device), masks.rec_s2(1, C, H // 2, W // 2, dtype, device),
            masks.s2_in_full(1, C, H, W, dtype, device), masks.s1_in_full(1, C, H, W, dtype, device)]


def test_mask_cache_is_bounded_by_bytes(monkeypatch):
    import weakref

    from hpcm_triton.models import masks

    # A 4K frame at the official widths (y: 320 × 144 × 240 after padding), on the meta device:
    # sizes only. Its masks are ~475 MB; the cache keeps at most its limit of them.
    monkeypatch.setattr(masks, "CACHE_LIMIT_BYTES", 256 * 2 ** 20)
    masks.cache_clear()
    sets = _mask_sets(320, 144, 240, "meta")
    total = sum(masks._nbytes(s) for s in sets)
    assert total > 450 * 2 ** 20
    assert 0 < masks.cache_bytes() <= 256 * 2 ** 20

    # Many distinct image sizes: the cache never holds more than the limit, least recently used go first.
    monkeypatch.setattr(masks, "CACHE_LIMIT_BYTES", 3 * 2 ** 20)
    masks.cache_clear()
    for h in range(16, 112, 16):
        _mask_sets(32, h, 64, "cpu")
        assert masks.cache_bytes() <= 3 * 2 ** 20
    # A set larger than the limit is built, returned and not kept.
    big = masks.eight_part(1, 64, 128, 128, torch.float32, "cpu")
    assert masks._nbytes(big) > 3 * 2 ** 20
    ref = weakref.ref(big[0])
    del big
    assert ref() is None, "an over-limit mask set stayed cached"
    # Cached or not, the masks are the same.
    again = masks.eight_part(1, 64, 128, 128, torch.float32, "cpu")
    monkeypatch.setattr(masks, "CACHE_LIMIT_BYTES", 2 ** 30)
    masks.cache_clear()
    for a, b in zip(again, masks.eight_part(1, 64, 128, 128, torch.float32, "cpu")):
        assert torch.equal(a, b)
    masks.cache_clear()


# ---------------------------------------------------------------- the context cell as a choice
# config_fingerprint of every preset, full and TINY widths, as files written so far carry them:
# choosing a cell design must not change them (a new config field would, through asdict).
PRESET_FINGERPRINTS = {
    "hpcm-base": ("9dbb0910a4b43a10", "ce8ee127ea752f6c"), "hpcm-large": ("75e21e338736683f", "f2ebc96c5bd9c8e5"),
    "phase1": ("2e6f1fc5702c85d1", "a9c8dcb744ef7767"), "phase2": ("e46e8812f527d84f", "3e04a19e20a00221"),
    "phase3": ("25ff5cc1c03fa894", "8f043481a78ae394"), "phase4": ("19f4a86a2531dba8", "ff45e49fcb010fb9"),
}


def test_cell_design_leaves_existing_fingerprints_alone():
    from hpcm_triton.bitstream import config_fingerprint
    from hpcm_triton.models.config import PRESETS

    got = {n: (config_fingerprint(c).hex(), config_fingerprint(c.with_(**TINY)).hex()) for n, c in PRESETS.items()}
    assert got == PRESET_FINGERPRINTS


def test_cell_design_is_one_config_switch():
    from hpcm_triton.models.config import PHASES, HPCMConfig
    from hpcm_triton.rwkv import ConcatRWKVContextCell

    with pytest.raises(ValueError, match="rwkv-fork"):
        HPCMConfig(cells=("rwkv", "rwkv", "rwkv-concat"))
    fork = PHASES[3].with_(cells=("rwkv-fork",) * 3)
    assert fork.rwkv_modules == PHASES[3].rwkv_modules and fork.pad_multiple == PHASES[3].pad_multiple
    m = tiny("phase3", cells=fork.cells)
    assert all(type(c) is ConcatRWKVContextCell for c in (m.attn_s1, m.attn_s2, m.attn_s3))
    assert [c.hidden_rate for c in (m.attn_s1, m.attn_s2, m.attn_s3)] == [2, 3, 4]
    own = tiny("phase3")
    # Everything but the three cells is the same module tree.
    strip = lambda sd: {k: v.shape for k, v in sd.items() if not k.startswith("attn_s")}  # noqa: E731
    assert strip(m.state_dict()) == strip(own.state_dict())
    rwkv_ids = {id(p) for p in {g["name"]: g for g in param_groups(m)}["rwkv"]["params"]}
    assert all(id(p) in rwkv_ids for p in m.attn_s3.parameters())
    x = torch.rand(1, 3, 128, 128)
    out = m.train()(x)
    (out["x_hat"].square().mean() + sum(-v.log().mean() for v in out["likelihoods"].values())).backward()
    assert m.attn_s1.conv_in.weight.grad is not None
    with torch.no_grad():
        assert m.eval()(x)["x_hat"].shape == x.shape
