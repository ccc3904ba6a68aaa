"""Defaults and limits shared by the command line and the library. Torch-free and numpy-free:
the command line reads them before it imports anything heavy."""

# Images larger than this (pixels, all images of a file together) are refused unless the
# caller raises the limit (``--max-pixels``): 8K UHD; compress, demo and evaluate read it from
# the image's header, decompress from the file's. Decoding one at the official widths needs
# about 400 bytes per pixel at its peak (g_s), so this default already means ~13 GB.
# Compressing needs more. Peak RSS of ``hpcm-triton compress --size full --threads 1``, measured
# for hpcm-base, phase3 and phase4 at 256² to 1448² (and hpcm-base at 2048²): a line fit of
# 1.33-1.50 GiB + 0.84-0.94 GiB per megapixel, at most 1.05 GiB per added megapixel between
# two sizes, and within 1.7 GiB + 1.0 GiB per megapixel at every size measured (4.8 GiB at
# 4.2 Mpx) -- so roughly 30-35 GiB for an image at this default.
DEFAULT_MAX_PIXELS = 7680 * 4320

# Natural photos that ship with installed packages (scikit-image's data module, matplotlib's
# sample data), so the demo and the tests run offline; ``hpcm_triton.images`` loads them.
BUNDLED_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble", "grace_hopper")

# Image files by suffix: what compress, evaluate and train read, and what decompress writes
# (the format follows the suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
