import os
import torch
# Kernels run through Triton's interpreter on machines without a GPU; it must be set before any triton kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
