import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# Tests mirror the package (tests/core, tests/formats, ...); shared helpers (tiny_models.py, this
# file) and a few test modules' helpers are imported by name from any folder.
sys.path[:0] = [str(ROOT), str(TESTS), *(str(d) for d in sorted(TESTS.iterdir()) if d.is_dir() and d.name != "__pycache__")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny models on one CPU thread. They gain nothing from more, and when
    another process holds one of a 2-core machine's cores, every operator split over 2 threads
    waits for the descheduled one: steps run up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quick_inductor():
    """Inductor on the CPU as every test of this process runs it: one thread (at these sizes more
    only add OpenMP barriers, which stall for seconds on a busy machine; inductor's C++ kernels
    read the thread count when they are compiled) and no SIMD (kernels compile a third faster;
    the graphs and guards are the same). The same settings in every test: inductor keeps what it
    picked for the process, and a kernel written for SIMD after a compile without it failed to
    build ("at::vec has not been declared")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield
    torch.set_num_threads(threads)


def realign(*models):
    """Copy every parameter and buffer of reference models into a fresh allocation, in place.

    diffusers and transformers leave loaded weights in a memory map of the file, at whatever
    offset the file's layout gives them; CPU kernels take different paths on differently
    aligned data, so the same weights give other last bits from another file. mini_tgate reads
    every weight into a fresh (64-byte aligned) allocation; this puts a reference on the same
    footing before outputs are compared bit for bit."""
    with torch.no_grad():
        for model in models:
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
    return models[0] if len(models) == 1 else models
