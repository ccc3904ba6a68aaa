"""CPU ↔ GPU portability of .hpcm files (docs/bitstream.md §5), a check to run on a GPU machine.

    python bench/gpu_portability.py [--models hpcm-base phase3] [--side 256]

For each model (seeded demo weights at full widths, the same on every machine): a file written
on the CPU is decoded on the GPU, and one written on the GPU is decoded on the CPU. Each decode
must succeed (every y step's index check matched, after repairs) and give pixels within one
8-bit level of the encoder's own reconstruction; the script prints the flips repaired and the
fraction of pixels off by one, and exits 1 if a check fails.

Skips (exit 0, with the reason) where there is no CUDA device, or no compressai: its rANS
coder is what reads and writes the streams, and the models import it.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["hpcm-base", "phase3"])
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--image", default="astronaut")
    p.add_argument("--gpu", default="cuda", help="the second device (cpu: a dry run of this script on a CPU machine)")
    args = p.parse_args(argv)

    if importlib.util.find_spec("compressai") is None:
        print("SKIP gpu_portability: compressai is not installed, and decoding a .hpcm file needs its rANS "
              "coder (pip install compressai==1.2.8)")
        return 0
    import torch

    if args.gpu != "cpu" and not torch.cuda.is_available():
        print("SKIP gpu_portability: no CUDA device")
        return 0
    from bench_portability import crop

    from hpcm_triton import bitstream
    from hpcm_triton import images as im
    from hpcm_triton.models.seeded import seeded_model

    where = torch.cuda.get_device_name(args.gpu) if args.gpu != "cpu" else "dry run on the CPU"
    print(f"gpu_portability: {where}, torch {torch.__version__}, "
          f"{args.image} {args.side}², full widths, seeded weights")
    x = crop(args.image, args.side)
    failures = 0
    for name in args.models:
        model = seeded_model(name, "full")
        for enc_dev, dec_dev in (("cpu", args.gpu), (args.gpu, "cpu")):
            t0 = time.perf_counter()
            model.to(enc_dev)
            data = bitstream.to_bytes(name, model, model.compress(x.to(enc_dev)))
            own = im.to_uint8(bitstream.decode(io.BytesIO(data), model, name).cpu()).int()
            model.to(dec_dev)
            info = bitstream.read(io.BytesIO(data), model, name)
            try:
                out = bitstream.decompress(info, model, details=True)
            except Exception as e:
                failures += 1
                print(f"  FAIL {name} {enc_dev} → {dec_dev}: {type(e).__name__}: {e}")
                continue
            diff = (im.to_uint8(out["x_hat"].cpu()).int() - own).abs()
            ok = int(diff.max()) <= 1
            failures += not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {name} {enc_dev} → {dec_dev}: {len(data):,} bytes, "
                  f"{bitstream.describe_flips(out['flips'])}, max Δ {int(diff.max())} level(s), "
                  f"{float((diff == 1).float().mean()):.2e} of pixels off by 1, {time.perf_counter() - t0:.1f} s")
        model.to("cpu")
    print("gpu_portability: " + ("all decodes within one level" if not failures else f"{failures} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
