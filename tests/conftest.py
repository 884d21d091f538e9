"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton, so Triton kernels run on the CPU
interpreter in CI (GPU tests are marked `gpu` and run on the device machine).
Tolerances come from one table, keyed by dtype (STYLE.md principle 6). The summary says how many
GPU tests the default `-m 'not gpu and not slow'` left out, and how to run them.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

TOLERANCES = {  # (atol, rtol)
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0):
    """allclose with the dtype table; the failure message prints max and mean absolute difference."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    diff = (actual.double() - expected.double()).abs()
    ok = torch.allclose(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)
    assert ok, (f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e} "
                f"(atol {atol * scale}, rtol {rtol * scale})")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a
    small shared CPU, two spinning OpenMP threads make the inference tests ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_DESELECTED = {"gpu": 0, "slow": 0}


def pytest_deselected(items):
    for item in items:
        for mark in _DESELECTED:
            if item.get_closest_marker(mark) is not None:
                _DESELECTED[mark] += 1
                break


def pytest_terminal_summary(terminalreporter):
    if _DESELECTED["gpu"]:
        terminalreporter.write_line(f"{_DESELECTED['gpu']} gpu tests deselected: they run on a CUDA machine "
                                    "with `pytest -m gpu`")
    if _DESELECTED["slow"]:
        terminalreporter.write_line(f"{_DESELECTED['slow']} slow tests deselected: run them with "
                                    "`pytest -m slow`")
