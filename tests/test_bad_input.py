"""Bad input: every error is a ValueError/TypeError, raised before anything changes
(parameters, optimizer state, coefficients, hyper-gradients all identical after the raise)."""
from __future__ import annotations

import copy
import re

import pytest
import torch

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod

ERR = (ValueError, TypeError)
NAN, INF = float("nan"), float("inf")
LEARNING = dict(betas=(0.85, 0.98), beta3=0.3, rho=0.6, c=0.7, gamma=0.8, hyper_warmup=0,
                hyper_lr={n: 1e-2 for n in sm.CANON})


def mada_snapshot(opt, params):
    return sm.snapshot(opt, params), dict(opt.coefficients), dict(opt.hypergradients)


def assert_mada_unchanged(snap, opt, params):
    base, coeffs, hyper = snap
    sm.assert_unchanged(base, opt, params)
    assert opt.coefficients == coeffs
    sm.deep_equal(hyper, dict(opt.hypergradients), "hypergradients")


# --------------------------------------------------------------------------- #
# Constructor arguments
# --------------------------------------------------------------------------- #

BAD_CTOR = {
    MADA: [
        dict(lr=-1e-3), dict(eps=-1e-8), dict(weight_decay=-0.1),
        dict(betas=(1.0, 0.999)), dict(betas=(-0.1, 0.999)), dict(betas=(0.9, 1.0)), dict(betas=(0.9, -0.5)),
        dict(betas=(0.9,)), dict(betas=0.9),
        # coefficient outside its (default) box
        dict(betas=(0.9995, 0.999)), dict(betas=(0.9, 0.4)), dict(betas=(0.9, 0.99995)),
        dict(beta3=-0.1), dict(beta3=0.995), dict(rho=1.5), dict(rho=-0.01), dict(c=1.01), dict(c=-0.2),
        dict(gamma=-1.0), dict(gamma=1.5),
        # ... or its paper / custom box
        dict(betas=(0.995, 0.95), bounds="paper"), dict(betas=(0.9, 0.999), bounds="paper"),
        dict(betas=(0.005, 0.95), bounds="paper"),
        dict(rho=1.0, bounds={"rho": (0.2, 0.8)}), dict(rho=0.5, gamma=0.05, bounds={"gamma": (0.1, 0.9)}),
        # unknown names / modes
        dict(learn=("beta1", "alpha")), dict(learn="beta1x"), dict(hyper_lr={"alpha": 0.1}),
        dict(hyper_lr={"beta1": 1e-3, "lr": 1e-3}), dict(bounds={"alpha": (0.0, 1.0)}), dict(bounds="authors"),
        dict(vbar="half"), dict(hyper_order="eager"), dict(backend="no-such-backend"),
        # other ranges
        dict(mod_beta=1.0), dict(mod_beta=-0.1), dict(lion_betas=(1.0, 0.98)), dict(lion_betas=(0.95, -0.1)),
        dict(hyper_clip=-1.0), dict(hyper_warmup=-1),
        # NaN / inf
        dict(lr=NAN), dict(lr=INF), dict(eps=NAN), dict(eps=INF), dict(weight_decay=NAN),
        dict(betas=(NAN, 0.999)), dict(betas=(0.9, NAN)), dict(beta3=NAN), dict(rho=NAN), dict(c=INF),
        dict(gamma=NAN), dict(mod_beta=NAN), dict(lion_betas=(NAN, 0.98)), dict(hyper_lr={"rho": NAN}),
        dict(hyper_lr={"beta1": INF}), dict(hyper_clip=NAN), dict(bounds={"rho": (NAN, 1.0)}),
        # boxes that are empty or leave the range where the moments are defined
        dict(rho=0.5, bounds={"rho": (0.8, 0.2)}), dict(bounds={"beta2": (0.5, 1.0)}),
        dict(bounds={"beta1": (0.0, 1.0)}), dict(bounds={"c": (-0.5, 1.0)}), dict(bounds={"gamma": (0.0, 1.5)}),
    ],
    AdaMod: [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, 1.5)), dict(beta3=1.0),
             dict(beta3=-0.5), dict(lr=NAN), dict(beta3=NAN), dict(weight_decay=INF), dict(backend="nope")],
    DiffMod: [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(len_memory=0), dict(len_memory=-3), dict(lr=INF),
              dict(eps=NAN), dict(backend="nope")],
    AVGrad: [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(lr=NAN), dict(backend="nope")],
}
CTOR_CASES = [(cls, kw) for cls, kws in BAD_CTOR.items() for kw in kws]


@pytest.mark.parametrize("cls,kw", CTOR_CASES, ids=[f"{c.__name__}-{kw}" for c, kw in CTOR_CASES])
def test_bad_constructor_arguments(make_params, cls, kw):
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ERR):
        cls(params, **{"backend": "reference", **kw})
    assert all(torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("name", ["beta1", "beta2", "beta3", "rho", "c", "gamma"])
def test_value_on_box_edge_is_accepted(make_params, name):
    """Guard for the box checks above: the end points themselves are legal initial values."""
    lo, hi = sm.DEFAULT_BOUNDS[name]
    for val in (lo, hi):
        k = {**dict(beta1=0.9, beta2=0.999, beta3=0.0, rho=1.0, c=1.0, gamma=1.0), name: val}
        MADA(make_params(), **sm.mada_kwargs(k), backend="reference")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_rejected(make_params, make_grads, dtype):
    params = make_params([(3,)])
    cplx = torch.randn(4, dtype=dtype, requires_grad=True)
    before = cplx.detach().clone()
    with pytest.raises(ERR):
        opt = MADA(params + [cplx], backend="reference")
        sm.set_grads(params, make_grads(params, 1)[0])
        cplx.grad = torch.randn(4, dtype=dtype)
        opt.step()  # only reached if the constructor accepted the complex parameter
    assert torch.equal(cplx.detach(), before)


# --------------------------------------------------------------------------- #
# Errors at step(): nothing may change (the bad param is the LAST one, so a
# validation that runs while updating would already have changed the others)
# --------------------------------------------------------------------------- #

@pytest.fixture
def stepped(make_params, make_grads):
    """A learning MADA (two groups) after 3 steps: state, coefficients and h all non-trivial."""
    params = make_params()
    opt = MADA([dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3)],
               backend="reference", **LEARNING)
    sm.run_steps(opt, params, make_grads(params, 3))
    assert opt.hypergradients
    good = make_grads(params, 1)[0]
    return opt, params, good


def _sparse(p):
    return torch.randn(p.shape).to_sparse()


def _complex(p):
    p.grad_dtype = None  # let autograd accept a grad of another dtype
    return torch.randn(p.shape, dtype=torch.complex128)


def _float32(p):
    p.grad_dtype = None
    return torch.randn(p.shape, dtype=torch.float32)


@pytest.mark.parametrize("make_bad", [_sparse, _complex, _float32], ids=["sparse", "complex", "dtype-mismatch"])
def test_bad_grad_changes_nothing(stepped, make_bad):
    opt, params, good = stepped
    sm.set_grads(params, good)
    bad = make_bad(params[-1])
    params[-1].grad = bad
    snap = mada_snapshot(opt, params)
    with pytest.raises(ERR):
        opt.step()
    assert_mada_unchanged(snap, opt, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device for a device mismatch")
def test_grad_on_other_device_changes_nothing(stepped):
    opt, params, good = stepped
    sm.set_grads(params, good)
    params[-1].grad_dtype = None
    try:
        params[-1].grad = good[-1].cuda()
    except RuntimeError:
        pytest.skip("autograd itself refuses a grad on another device")
    snap = mada_snapshot(opt, params)
    with pytest.raises(ERR):
        opt.step()
    assert_mada_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", [AdaMod, DiffMod, AVGrad])
def test_bad_grad_other_optimizers(make_params, make_grads, cls):
    params = make_params()
    opt = cls(params, lr=1e-2, backend="reference")
    sm.run_steps(opt, params, make_grads(params, 2))
    sm.set_grads(params, make_grads(params, 1)[0])
    params[-1].grad = _sparse(params[-1])
    snap = sm.snapshot(opt, params)
    with pytest.raises(ERR):
        opt.step()
    sm.assert_unchanged(snap, opt, params)


@pytest.mark.parametrize("key,value", [("lr", -1e-3), ("lr", NAN), ("lr", INF), ("weight_decay", NAN),
                                       ("weight_decay", -0.5)])
def test_bad_group_value_set_before_step(stepped, key, value):
    opt, params, good = stepped
    sm.set_grads(params, good)
    opt.param_groups[-1][key] = value  # the last group: the first one would be processed already
    snap = mada_snapshot(opt, params)
    with pytest.raises(ERR):
        opt.step()
    assert_mada_unchanged(snap, opt, params)


def test_closure_error_propagates_and_changes_nothing(stepped):
    opt, params, good = stepped
    snap = mada_snapshot(opt, params)

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert_mada_unchanged(snap, opt, params)


# --------------------------------------------------------------------------- #
# load_state_dict with a state_dict that does not fit
# --------------------------------------------------------------------------- #

def _other_learn(params, sd):
    other = MADA([dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3)],
                 backend="reference", **dict(LEARNING, learn=("rho", "gamma")))
    sm.run_steps(other, params, [[torch.randn(p.shape) for p in params]] * 2)
    return other.state_dict()


def _other_allocation(params, sd):
    cfg = dict(LEARNING, beta3=0.0, learn=("beta1", "beta2", "rho", "c", "gamma"))  # no n, g_prev
    other = MADA([dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3)],
                 backend="reference", **cfg)
    sm.run_steps(other, params, [[torch.randn(p.shape) for p in params]] * 2)
    return other.state_dict()


def _fewer_params(params, sd):
    other = MADA([dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:-1], lr=3e-3)],
                 backend="reference", **LEARNING)
    sm.run_steps(other, params[:-1], [[torch.randn(p.shape) for p in params[:-1]]] * 2)
    return other.state_dict()


def _from_adamw(params, sd):
    other = torch.optim.AdamW([dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3)])
    for p in params:
        p.grad = torch.randn(p.shape)
    other.step()
    return other.state_dict()


def _wrong_moment_shape(params, sd):
    sd["state"][0]["m"] = torch.zeros(sd["state"][0]["m"].numel() + 1)
    return sd


def _wrong_tangent_rows(params, sd):
    sd["state"][1]["tangents"] = sd["state"][1]["tangents"][:3].clone()
    return sd


def _missing_moment(params, sd):
    del sd["state"][2]["v"]
    return sd


def _missing_mada_key(params, sd):
    del sd["mada"]
    return sd


@pytest.mark.parametrize("corrupt", [_other_learn, _other_allocation, _fewer_params, _from_adamw,
                                     _wrong_moment_shape, _wrong_tangent_rows, _missing_moment, _missing_mada_key])
def test_load_state_dict_mismatch_changes_nothing(stepped, corrupt):
    opt, params, good = stepped
    foreign_params = [p.detach().clone().requires_grad_() for p in params]
    bad_sd = corrupt(foreign_params, copy.deepcopy(opt.state_dict()))
    snap = mada_snapshot(opt, params)
    with pytest.raises(ERR):
        opt.load_state_dict(bad_sd)
    assert_mada_unchanged(snap, opt, params)
    # and the optimizer still works afterwards
    sm.set_grads(params, good)
    opt.step()


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #

def test_unbuilt_backend_says_why_and_how(make_params, make_grads, no_backend_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ERR) as ei:
        opt = MADA(params, backend="cuda")
        sm.run_steps(opt, params, make_grads(params, 1))
    msg = str(ei.value)
    assert re.search("cuda", msg, re.I), msg
    assert re.search(r"not (built|available|compiled|installed|found)|unavailable|no cuda|requires?|missing",
                     msg, re.I), f"message does not say why: {msg!r}"
    assert re.search(r"install|build|compil|pip|setup|MADA_FUSED", msg, re.I), f"message does not say how: {msg!r}"
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_env_reference_overrides_auto(make_params, make_grads, monkeypatch):
    monkeypatch.setenv("MADA_FUSED_BACKEND", "reference")
    params = make_params()
    shadow = [p.detach().clone().requires_grad_() for p in params]
    grads = make_grads(params, 5)
    opt = MADA(params, lr=1e-2, beta3=0.0, rho=1.0, c=1.0, gamma=1.0, learn=(), backend="auto")
    ref = torch.optim.Adam(shadow, lr=1e-2)
    sm.run_steps(opt, params, grads)
    sm.run_steps(ref, shadow, grads)
    for a, b in zip(params, shadow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("value", ["no-such-backend", "cuda"])
def test_env_backend_is_honoured_for_auto(make_params, make_grads, monkeypatch, value):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("MADA_FUSED_BACKEND", value)
    params = make_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ERR):
        opt = MADA(params, backend="auto")
        sm.run_steps(opt, params, make_grads(params, 1))
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_default_backend_auto_works_on_cpu(make_params, make_grads, no_backend_env):
    """Without the env var, "auto" must pick something that works here and computes docs/spec.md."""
    params = make_params()
    shadow = [p.detach().clone().requires_grad_() for p in params]
    grads = make_grads(params, 5)
    opt = MADA(params, lr=1e-2, weight_decay=0.1, beta3=0.0, rho=1.0, c=1.0, gamma=1.0, learn=())
    ref = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.1)
    sm.run_steps(opt, params, grads)
    sm.run_steps(ref, shadow, grads)
    for a, b in zip(params, shadow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
