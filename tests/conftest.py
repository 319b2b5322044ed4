"""Shared fixtures: float64 by default, a fresh (but reproducible) seed per test,
small parameter sets of odd shapes and a tiny 2-layer regression problem."""
from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so tests can `import spec_model`

ODD_SHAPES = [(3, 5), (7,), (2, 3, 4), (1,)]


# The float64 default applies to this suite's own modules only; other test files in this
# directory (GPU backends, distributed) keep torch's float32 default unless they ask for it.
FLOAT64_MODULES = {"test_reference_math.py", "test_hypergrad.py", "test_optimizer_api.py", "test_bad_input.py"}


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _seed_and_dtype(request):
    """A seed derived from the test id (fresh data per test, reproducible run to run);
    float64 as the default dtype in this suite's modules."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    if request.node.path.name in FLOAT64_MODULES:
        request.getfixturevalue("float64_default")
    yield


@pytest.fixture
def no_backend_env(monkeypatch):
    """Tests of backend="auto" must not inherit a MADA_FUSED_BACKEND from the caller."""
    monkeypatch.delenv("MADA_FUSED_BACKEND", raising=False)


@pytest.fixture
def make_params():
    """make_params(shapes=ODD_SHAPES, dtype=float64) -> list of leaf tensors (requires_grad)."""

    def make(shapes=ODD_SHAPES, dtype=torch.float64):
        return [torch.randn(*s, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]

    return make


@pytest.fixture
def make_grads():
    """make_grads(params, steps, scale=1.0) -> list (steps) of lists of fresh random grads.

    Magnitudes vary per element and per step (log-normal scale) so that element-wise
    switches (sign(gh^2 - v'), the AdaMod clip) go both ways."""

    def make(params, steps, scale=1.0):
        out = []
        for _ in range(steps):
            row = []
            for p in params:
                mag = torch.exp(0.7 * torch.randn(p.shape, dtype=torch.float64))
                row.append((scale * mag * torch.randn(p.shape, dtype=torch.float64)).to(p.dtype))
            out.append(row)
        return out

    return make


class TwoLayer:
    """y = W2 tanh(W1 x + b1) + b2, squared loss, odd sizes (7 -> 5 -> 3, 11 samples)."""

    def __init__(self):
        self.x = torch.randn(11, 7)
        self.y = torch.randn(11, 3)
        self.init = [torch.randn(5, 7) * 0.5, torch.randn(5) * 0.1, torch.randn(3, 5) * 0.5, torch.randn(3) * 0.1]

    def params(self):
        """A fresh copy of the initial parameters, as leaves."""
        return [w.clone().requires_grad_() for w in self.init]

    def loss(self, params):
        w1, b1, w2, b2 = params
        h = torch.tanh(self.x @ w1.t() + b1)
        return ((h @ w2.t() + b2 - self.y) ** 2).mean()

    def closure(self, opt, params):
        def closure():
            opt.zero_grad()
            loss = self.loss(params)
            loss.backward()
            return loss

        return closure


@pytest.fixture
def two_layer():
    return TwoLayer()



def pytest_configure(config):
    # torch emits this from its own internals the first time forward-mode AD runs
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
    config.addinivalue_line("markers", "native_driver: builds and runs tests/native's cuda_on_cpu_driver; "
                            "scripts/test.sh leaves these to .ci/cuda_on_cpu_sanitize.sh, which builds it anyway")


def pytest_collection_modifyitems(items):
    """Marks every test that uses test_cuda_on_cpu.py's ``driver`` fixture native_driver."""
    for item in items:
        if item.path.name == "test_cuda_on_cpu.py" and "driver" in getattr(item, "fixturenames", ()):
            item.add_marker("native_driver")
