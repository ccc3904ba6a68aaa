import os

import pytest
import torch

# Kernels run through Triton's interpreter on machines without a GPU; it must be set before any triton kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Build the CPU kernels once up front (cached per machine), so that no test -- and no CLI
# subprocess whose output a test reads -- pays for or prints the first build.
import kernels_cpu  # noqa: E402

kernels_cpu.available()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread (restored afterwards).

    TINY models gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    spinning threads slow them down many times over.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
