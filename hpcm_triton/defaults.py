"""Defaults and limits shared by the command line and the library. Torch-free and numpy-free:
the command line reads them before it imports anything heavy."""

# Images larger than this (pixels, all images of a file together) are refused unless the
# caller raises the limit (``--max-pixels``): 8K UHD. Decoding one at the official widths
# needs about 400 bytes per pixel at its peak (g_s), so this default already means ~13 GB.
DEFAULT_MAX_PIXELS = 7680 * 4320

# Natural photos that ship with installed packages (scikit-image's data module, matplotlib's
# sample data), so the demo and the tests run offline; ``hpcm_triton.images`` loads them.
BUNDLED_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble", "grace_hopper")

# Image files by suffix: what compress, evaluate and train read, and what decompress writes
# (the format follows the suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
