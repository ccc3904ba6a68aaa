"""CompressAI interop: what a CompressAI user tries first.

compressai.utils.eval_model's inference() pads to 64, calls compress, then
decompress(strings, shape) and crops its own padding; the models are CompressionModels
(isinstance, aux_loss, update, load_state_dict of CDF buffers, from_state_dict) and the six
variants are in CompressAI's registries under our names. TINY widths on a real 300×451 photo.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

import hpcm_triton
from hpcm_triton import get_model
from hpcm_triton.models import TINY
from hpcm_triton.models.hpcm import CodedShape
from hpcm_triton.models.seeded import seeded_init_

compressai = pytest.importorskip("compressai")
from compressai.models import CompressionModel  # noqa: E402
from compressai.ops import compute_padding  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = list(hpcm_triton.MODELS)


def tiny(name):
    return seeded_init_(get_model(name, **TINY)).eval()


@pytest.fixture(scope="module")
def chelsea():
    from skimage import data

    return torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float().div(255)  # (3, 300, 451)


@pytest.fixture(scope="module")
def eval_model_module():
    # eval_model sets torch's thread count to 1 at import; the one_thread fixture restores it.
    from compressai.utils.eval_model import __main__ as em

    return em


@pytest.mark.parametrize("name", VARIANTS)
def test_compressai_inference_on_a_photo(name, chelsea, eval_model_module):
    m = tiny(name)
    m.update()
    assert chelsea.shape[-2:] == (300, 451)  # a size that is not a multiple of 64, 128 or 256
    rv = eval_model_module.inference(m, chelsea)
    # Same numbers from our side: compress CompressAI's 64-padded image, decode, crop its padding.
    pad, unpad = compute_padding(300, 451, min_div=64)
    xp = F.pad(chelsea[None], pad)
    enc = m.compress(xp)
    dec = m.decompress(enc["strings"], enc["shape"])["x_hat"]
    assert dec.shape == xp.shape  # exactly the size that was compressed (320×512), not 512×512
    with torch.no_grad():
        assert torch.equal(dec, m(xp)["x_hat"].clamp(0, 1))
    ref = eval_model_module.compute_metrics(chelsea[None], F.pad(dec, unpad), 255)
    assert rv["psnr-rgb"] == pytest.approx(ref["psnr-rgb"], abs=1e-9)
    assert rv["ms-ssim-rgb"] == pytest.approx(ref["ms-ssim-rgb"], abs=1e-9)
    y, z = enc["strings"][0][0], enc["strings"][1][0]
    assert rv["bpp"] == pytest.approx(8 * (len(y) + len(z)) / (300 * 451))


def test_decompress_returns_the_compressed_size(chelsea):
    m = tiny("hpcm-base")
    m.update()
    x = chelsea[None, :, :200, :333]
    enc = m.compress(x)
    shape = enc["shape"]
    # A 2-tuple of z's size for everything that reads it (the .hpcm container, CompressAI)...
    assert isinstance(shape, tuple) and tuple(shape) == (4, 8) and shape == (4, 8)
    # ...that carries the image size, also through pickling (multiprocessing, torch.save).
    assert shape.image_size == (200, 333) and pickle.loads(pickle.dumps(shape)).image_size == (200, 333)
    assert m.decompress(enc["strings"], shape)["x_hat"].shape == x.shape
    assert m.decompress(enc["strings"], pickle.loads(pickle.dumps(shape)))["x_hat"].shape == x.shape
    # A plain (zh, zw) still decodes, to the padded size; an explicit image_size wins.
    assert m.decompress(enc["strings"], tuple(shape))["x_hat"].shape[-2:] == (256, 512)
    assert m.decompress(enc["strings"], shape, image_size=(256, 400))["x_hat"].shape[-2:] == (256, 400)
    # The .hpcm container reads the same fields.
    from hpcm_triton import bitstream

    info = bitstream.from_bytes(bitstream.to_bytes("hpcm-base", m, enc))
    assert info["shape"] == (4, 8) and info["image_size"] == (200, 333)
    assert repr(CodedShape(4, 8, (200, 333))) == "CodedShape(z=(4, 8), image_size=(200, 333))"


def test_models_are_compressai_compression_models(chelsea):
    m = tiny("phase3")
    assert isinstance(m, CompressionModel)
    # update(): CompressAI's signature; our default table is the official 60-scale one.
    assert m.update(force=True, update_quantiles=True) is True and m.scale_table.numel() == 60
    # aux_loss(): a tensor CompressAI's training loop can call .backward() on.
    aux = m.aux_loss()
    assert isinstance(aux, torch.Tensor) and aux.item() == 0.0
    aux.backward()
    # load_state_dict through CompressionModel: CDF buffers of another size load (no size mismatch).
    from compressai.models import get_scale_table

    m.update(get_scale_table(), force=True)  # CompressAI's 64-scale table: other buffer sizes
    fresh = get_model("phase3", **TINY).eval()
    fresh.update()
    assert fresh.quantized_cdf_y.shape != m.quantized_cdf_y.shape
    CompressionModel.load_state_dict(fresh, m.state_dict())
    assert torch.equal(fresh.quantized_cdf_y, m.quantized_cdf_y) and fresh.scale_table.numel() == 64
    x = chelsea[None, :, :128, :128]
    assert fresh.compress(x)["strings"] == m.compress(x)["strings"]


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "state_dict_key"])
def test_from_state_dict(wrap):
    m = tiny("phase2")
    m.update()
    sd = m.state_dict()
    if wrap == "module_prefix":
        sd = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "state_dict_key":
        sd = {"state_dict": sd, "epoch": 3}
    loaded = hpcm_triton.HPCM_Phase2.from_state_dict(sd, attention_heads=TINY["attention_heads"])
    assert loaded.config == m.config and not loaded.training
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_variants_are_in_compressai_registries():
    from compressai.registry import MODELS as REGISTRY
    from compressai.zoo import image_models, models
    from compressai.zoo.image import model_architectures

    for name, cls in hpcm_triton.MODELS.items():
        assert REGISTRY[name] is cls and model_architectures[name] is cls
        assert image_models[name] is models[name]
        with pytest.raises(ValueError, match="no pretrained weights"):
            image_models[name](quality=3, pretrained=True)
    built = image_models["hpcm-base"](quality=1, metric="mse", pretrained=False, **TINY)
    assert isinstance(built, hpcm_triton.HPCM_Base) and built.config.M == TINY["M"]


def test_compressai_eval_model_cli_runs_a_checkpoint(tmp_path, chelsea, eval_model_module):
    """`python -m compressai.utils.eval_model checkpoint DIR -a hpcm-base -p CKPT`, in process
    (the registration happens when hpcm_triton is imported)."""
    from hpcm_triton import images as im

    data = tmp_path / "imgs"
    data.mkdir()
    im.save_image(chelsea[None], data / "chelsea.png")
    m = tiny("hpcm-base")
    ckpt = tmp_path / "hpcm-base-tiny.pth.tar"
    torch.save({"state_dict": m.state_dict()}, ckpt)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_model_module.main(["checkpoint", str(data), "-a", "hpcm-base", "-p", str(ckpt)])
    res = json.loads(out.getvalue())
    r = res["results"]
    assert res["name"] == "hpcm-base-mse" and len(r["bpp"]) == 1
    assert 0 < r["bpp"][0] < 24 and 0 < r["psnr-rgb"][0] < 60 and 0 < r["ms-ssim-rgb"][0] <= 1


def test_import_registers_with_compressai_in_a_fresh_process(tmp_path, chelsea):
    """`import hpcm_triton` alone (no model touched) is enough for CompressAI's own command line:
    `eval_model checkpoint -a hpcm-base` in a new process, with compressai imported after
    hpcm_triton, and the registries filled when compressai comes first too."""
    import subprocess
    import sys

    from hpcm_triton import images as im

    data = tmp_path / "imgs"
    data.mkdir()
    im.save_image(chelsea[None, :, :192, :192], data / "crop.png")  # > 160 px: eval_model computes MS-SSIM
    ckpt = tmp_path / "hpcm-base-tiny.pth.tar"
    torch.save({"state_dict": tiny("hpcm-base").state_dict()}, ckpt)
    code = ("import sys, hpcm_triton\n"
            "assert 'torch' not in sys.modules\n"  # importing the package stays cheap
            "from compressai.utils.eval_model.__main__ import main\n"
            f"main(['checkpoint', {str(data)!r}, '-a', 'hpcm-base', '-p', {str(ckpt)!r}])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["name"] == "hpcm-base-mse" and len(res["results"]["bpp"]) == 1
    code = ("import compressai.zoo, hpcm_triton\n"
            "assert 'phase3' in compressai.zoo.image_models and 'hpcm-base' in compressai.registry.MODELS\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
