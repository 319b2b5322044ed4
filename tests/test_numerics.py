"""Finite input gives finite output, the same on every backend (issue 18, item 4).

A gradient element above ~1.8e19 squares to inf in fp32. AdamW takes that in its
stride: v = inf, the element's step is 0, the parameter stays finite. So must
every optimizer here: the blends a * x + (1 - a) * y (Yogi's c, AVGrad's rho)
once turned such an element NaN through 0 * inf with the coefficient at an end
of its range, even with nothing learned, and Yogi's sign(inf - inf) did so with
c inside its range. Tangent rows of such an element may be non-finite (their
hyper-gradient is another layer's guard); params and moments may not.

Every present backend runs the same steps (reference, cpu, the Triton
interpreter) and is held to the reference, inf and NaN positions included.
"""
from __future__ import annotations

import pytest
import torch

from mada_fused import MADA, AVGrad, AdaMod, DiffMod
from mada_fused import backends as registry

from conformance_cases import ALL, FULL  # noqa: E402  (tests/, on sys.path through conftest)

HUGE = (1e20, -1e20, 3e38, -3e38, 2e19)


def _present() -> list[str]:
    names = ["reference", "cpu"]
    try:
        import triton  # noqa: F401
        names.append("triton")
    except ImportError:
        pass
    return [n for n in names if n in registry.available()]


BACKENDS = _present()

# (optimizer, kwargs, steps). Learning cases take one step: their tangent rows
# may be non-finite at overflowed elements, and what the hyper-update does with
# them is hyper.py's business, not the element math's.
CASES = {
    "adam_corner": (MADA, dict(lr=1e-2, weight_decay=0.1, learn=()), 3),
    "pure_yogi": (MADA, dict(lr=1e-2, c=0.0, learn=()), 3),
    "fixed_interior": (MADA, dict(FULL, learn=()), 3),
    "rho_zero": (MADA, dict(lr=1e-2, rho=0.0, learn=()), 3),
    "avgrad": (AVGrad, dict(lr=1e-2), 3),
    "lion_mod": (MADA, dict(lr=1e-2, gamma=0.5, mod_beta=0.9, learn=()), 3),
    "learn_corner": (MADA, dict(lr=1e-2, learn=("beta1", "beta2", "rho", "c"), hyper_warmup=0), 1),
    "learn_all": (MADA, dict(FULL, mod_beta=0.9), 1),
    "learn_all_ends": (MADA, dict(lr=1e-2, rho=0.0, c=0.0, gamma=0.0, learn=ALL, hyper_warmup=0), 1),
    "adamod": (AdaMod, dict(lr=1e-2, beta3=0.9), 3),
    "diffmod": (DiffMod, dict(lr=1e-2, len_memory=10), 3),
}


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MADA_TRITON_CONFIG", raising=False)


def _grads(steps: int, n: int = 64, flip: bool = False) -> list[torch.Tensor]:
    """Ordinary gradients, with every HUGE value at fixed elements on every step, of the same
    sign or, with ``flip``, of alternating sign."""
    out = []
    for i in range(steps):
        g = torch.randn(n, dtype=torch.float32)
        g[: len(HUGE)] = torch.tensor(HUGE) * (-1) ** (i * flip)
        out.append(g)
    return out


def _run(backend: str, cls, kw: dict, grads: list[torch.Tensor], init: torch.Tensor):
    p = init.clone().requires_grad_()
    opt = cls([p], backend=backend, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if isinstance(v, torch.Tensor)}
    return p.detach().clone(), state


# Alternating signs of 3e38 overflow g - g_prev itself, which Adan's term (MADA's beta3 != 0)
# carries into n and A, where 0 * inf is no end-point blend: those MADA cases see one sign only.
ADAN = [c for c, (cls, kw, steps) in CASES.items() if cls is MADA and kw.get("beta3", 0.0) != 0.0 and steps > 1]


@pytest.mark.parametrize("flip", [False, True], ids=["same_sign", "alternating"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_grads_stay_finite_and_agree(interpret, backend, case, flip):
    cls, kw, steps = CASES[case]
    if flip and case in ADAN:
        pytest.skip("Adan's g - g_prev overflows itself")
    grads = _grads(steps, flip=flip)
    init = torch.randn(grads[0].numel())
    ref_p, ref_st = _run("reference", cls, kw, grads, init)
    p, st = _run(backend, cls, kw, grads, init)
    assert torch.isfinite(p).all(), f"{backend}: non-finite params {p[~torch.isfinite(p)]}"
    for name, x in st.items():
        if name != "tangents":
            assert not x.isnan().any(), f"{backend}: NaN in state {name!r}"
    # The overflowed elements did overflow (v = inf, as AdamW's exp_avg_sq), so the case tests something.
    assert torch.isinf(st["v"]).any()
    torch.testing.assert_close(p, ref_p, rtol=2e-6, atol=1e-6)
    for name in ref_st:
        if name == "tangents":
            # Which elements overflowed, and to what; tangent values to rounding are
            # test_cpu_backend's and test_triton_backend's (rows cancel, tolerances are per term).
            a, b = st[name], ref_st[name]
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[a.isinf()], b[b.isinf()]), case
        else:
            torch.testing.assert_close(st[name], ref_st[name], rtol=2e-6, atol=1e-6, equal_nan=True,
                                       msg=lambda m, name=name: f"{backend} {case} state {name!r}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_corner_matches_adamw_on_overflow(interpret, backend):
    """At Adam's corner an element whose v overflowed moves as AdamW moves it: by weight decay only.

    AdamW multiplies (1 - beta2) * g * g left to right, so its v overflows only
    from |g| ~ 1.8e19 / sqrt(1 - beta2); ours squares g first (Adam's corner is
    the general MADA step with its terms at their end points, bit for bit), so
    1e20 and 2e19 overflow here and not there: those elements stop, AdamW's move.
    """
    grads = _grads(3)
    init = torch.randn(grads[0].numel())
    lr, wd = 1e-2, 0.1
    p, st = _run(backend, MADA, dict(lr=lr, weight_decay=wd, learn=()), grads, init)
    q = init.clone().requires_grad_()
    adamw = torch.optim.AdamW([q], lr=lr, weight_decay=wd, foreach=False)
    for g in grads:
        q.grad = g.clone()
        adamw.step()
    ours_inf, theirs_inf = torch.isinf(st["v"]), torch.isinf(adamw.state[q]["exp_avg_sq"])
    q = q.detach()
    assert theirs_inf.any() and (ours_inf | ~theirs_inf).all()  # 3e38 overflows both
    # Overflowed: exactly theta * (1 - lr * wd)^3, as AdamW's decay alone moves it.
    decayed = init.clone()
    for _ in grads:
        decayed = decayed * (1 - lr * wd)
    assert torch.equal(p[ours_inf], decayed[ours_inf])
    assert torch.equal(p[theirs_inf], q[theirs_inf])
    # Ordinary elements: the same step, to rounding.
    torch.testing.assert_close(p[~ours_inf], q[~ours_inf], rtol=1e-5, atol=1e-6)
