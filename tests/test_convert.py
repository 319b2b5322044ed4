"""mada_fused.convert (switching to and from torch.optim.Adam/AdamW mid-run) and
load_state_dict of a plain-number step (torch's format before 1.12)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod
from mada_fused.convert import from_adam, to_adamw

CORNER = dict(beta3=0.0, rho=1.0, c=1.0, gamma=1.0, mod_beta=0.0, learn=())
SHAPES = [(3, 5), (7,), (2, 3, 2)]
N, K = 4, 5  # steps before and after the switch


@pytest.fixture(autouse=True)
def _f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def leaves(init):
    return [w.detach().clone().requires_grad_() for w in init]


def groups(ps):
    """Two groups with their own lr and weight decay."""
    return [dict(params=ps[:2], lr=2e-2, weight_decay=0.1), dict(params=ps[2:], lr=5e-3, weight_decay=0.0)]


def close(a, b, rtol=1e-12, atol=1e-14):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


def problem(steps):
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) * math.exp(torch.randn(()).item()) for s in SHAPES] for _ in range(steps)]
    return init, grads


def adamw_run(init, grads, **kw):
    ps = leaves(init)
    opt = torch.optim.AdamW(groups(ps), **kw)
    sm.run_steps(opt, ps, grads)
    return opt, ps


# --------------------------------------------------------------------------- #
# Adam -> mada-fused -> Adam at Adam's corner: the same run as AdamW throughout
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_adamw_to_mada_corner_continues_the_adamw_run(backend):
    init, grads = problem(N + K)
    _, whole = adamw_run(init, grads)
    adamw, ps = adamw_run(init, grads[:N])
    opt = MADA(groups(ps), backend=backend, **CORNER)
    opt.load_state_dict(from_adam(adamw.state_dict(), opt))
    for a in ps:
        assert int(opt.state[a]["step"]) == N
        torch.testing.assert_close(opt.state[a]["m"], adamw.state[a]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[a]["v"], adamw.state[a]["exp_avg_sq"], rtol=0, atol=0)
    sm.run_steps(opt, ps, grads[N:])
    for a, b in zip(ps, whole):
        close(a, b)
    assert [int(opt.state[a]["step"]) for a in ps] == [N + K] * 3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mada_corner_to_adamw_continues_the_mada_run(backend):
    init, grads = problem(N + K)
    pw = leaves(init)
    whole = MADA(groups(pw), backend=backend, **CORNER)
    sm.run_steps(whole, pw, grads)
    ps = leaves(init)
    opt = MADA(groups(ps), backend=backend, **CORNER)
    sm.run_steps(opt, ps, grads[:N])
    adamw = torch.optim.AdamW(groups(ps))
    adamw.load_state_dict(to_adamw(opt))
    assert adamw.param_groups[0]["lr"] == 2e-2 and adamw.param_groups[0]["weight_decay"] == 0.1
    assert adamw.param_groups[1]["lr"] == 5e-3 and adamw.param_groups[1]["decoupled_weight_decay"]
    m_before = [opt.state[a]["m"].clone() for a in ps]
    sm.run_steps(adamw, ps, grads[N:])
    for a, b in zip(ps, pw):
        close(a, b)
    assert all(int(adamw.state[a]["step"]) == N + K for a in ps)
    # AdamW stepped copies, not the mada-fused optimizer's own buffers
    assert all(torch.equal(opt.state[a]["m"], m) for a, m in zip(ps, m_before))


# --------------------------------------------------------------------------- #
# The other optimizers: Adam's moments, the rest fresh (see the module docstring)
# --------------------------------------------------------------------------- #

def _spec_continue(name, theta, g, st, lr, wd):
    """One step of docs/spec.md from state ``st`` (an independent model)."""
    if name == "AVGrad":
        return sm.avgrad_step(theta, g, st, lr=lr, weight_decay=wd)
    if name == "AdaMod":
        return sm.adamod_step(theta, g, st, lr=lr, beta3=0.9, weight_decay=wd)
    return sm.diffmod_step(theta, g, st, lr=lr, len_memory=10, weight_decay=wd)


MAKE = {
    "AVGrad": lambda gs, b: AVGrad(gs, backend=b),
    "AdaMod": lambda gs, b: AdaMod(gs, beta3=0.9, backend=b),
    "DiffMod": lambda gs, b: DiffMod(gs, len_memory=10, backend=b),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(MAKE))
def test_from_adamw_then_steps_as_the_spec_says(name, backend):
    init, grads = problem(N + K)
    adamw, ps = adamw_run(init, grads[:N])
    opt = MAKE[name](groups(ps), backend)
    opt.load_state_dict(from_adam(adamw.state_dict(), opt))
    fresh = {"AVGrad": {"vb"}, "AdaMod": {"s"}, "DiffMod": {"s", "g_prev"}}[name]
    model = []
    for a in ps:
        st = opt.state[a]
        assert set(st) == {"step", "m", "v"} | fresh
        assert torch.equal(st["m"], adamw.state[a]["exp_avg"]) and torch.equal(st["v"], adamw.state[a]["exp_avg_sq"])
        if "vb" in st:
            assert torch.equal(st["vb"], st["v"])  # the running mean starts at the present v
        for key in fresh - {"vb"}:
            assert torch.equal(st[key], torch.zeros_like(a))
        model.append({k: (int(v) if k == "step" else v.clone()) for k, v in st.items()})
    thetas = [a.detach().clone() for a in ps]
    lrs, wds = [2e-2, 2e-2, 5e-3], [0.1, 0.1, 0.0]
    for gs in grads[N:]:
        sm.set_grads(ps, gs)
        opt.step()
        for i, g in enumerate(gs):
            thetas[i], model[i] = _spec_continue(name, thetas[i], g, model[i], lrs[i], wds[i])
    for a, b in zip(ps, thetas):
        close(a, b, rtol=1e-11, atol=1e-13)


def test_from_adamw_into_learning_mada():
    """Every MADA state exists; the coefficients stay the target's own; the first step after
    the switch computes no hyper-gradient (its zero tangents are no previous step's) and is
    spec section 1 from the converted state."""
    init, grads = problem(N + 2)
    adamw, ps = adamw_run(init, grads[:N], betas=(0.85, 0.98), eps=1e-7)
    start = dict(beta1=0.85, beta2=0.98, beta3=0.3, rho=0.6, c=0.7, gamma=0.8)
    kw = dict(sm.mada_kwargs(start), eps=1e-7, mod_beta=0.9, hyper_warmup=0, hyper_lr={n: 1e-3 for n in sm.CANON},
              learn=("beta3", "rho", "c", "gamma"))
    opt = MADA(groups(ps), backend="reference", **kw)
    saved = [a.detach().clone() for a in ps]
    sm.run_steps(opt, ps, [[torch.randn(s) for s in SHAPES] for _ in range(3)])  # tangents, h, moved k
    with torch.no_grad():
        for a, w in zip(ps, saved):
            a.copy_(w)
    coeffs, h = opt.coefficients, opt.hypergradients
    assert coeffs != start and h
    opt.load_state_dict(from_adam(adamw.state_dict(), opt))
    model = []
    for a in ps:
        st = opt.state[a]
        assert set(st) == {"step", "m", "v", "n", "g_prev", "l", "vb", "s", "tangents"}
        assert int(st["step"]) == N and torch.equal(st["m"], adamw.state[a]["exp_avg"])
        assert torch.equal(st["vb"], adamw.state[a]["exp_avg_sq"]) and torch.equal(st["v"], st["vb"])
        assert all(not st[key].any() for key in ("n", "g_prev", "l", "s", "tangents"))
        model.append({k: (int(v) if k == "step" else v.clone()) for k, v in st.items()})
    sm.set_grads(ps, grads[N])
    opt.step()
    assert opt.coefficients == coeffs and opt.hypergradients == h
    k = {n: torch.tensor(v) for n, v in coeffs.items()}
    for i, (a, g) in enumerate(zip(ps, grads[N])):
        lr, wd = (2e-2, 0.1) if i < 2 else (5e-3, 0.0)
        expected = sm.mada_step(saved[i], g, model[i], k, lr=lr, weight_decay=wd, eps=1e-7, mod_beta=0.9)[0]
        close(a, expected, rtol=1e-11, atol=1e-13)
    sm.set_grads(ps, grads[N + 1])
    opt.step()
    assert opt.hypergradients != h and opt.coefficients != coeffs


@pytest.mark.parametrize("cls", [AdaMod, DiffMod, AVGrad])
def test_to_adamw_exports_the_moments(cls):
    init, grads = problem(N + 1)
    ps = leaves(init)
    opt = cls(groups(ps), betas=(0.8, 0.99), eps=1e-6, backend="reference")
    sm.run_steps(opt, ps, grads[:N])
    adamw = torch.optim.AdamW(groups(ps))
    adamw.load_state_dict(to_adamw(opt))
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in adamw.param_groups)
    before = [(a.detach().clone(), opt.state[a]["m"].clone(), opt.state[a]["v"].clone()) for a in ps]
    sm.set_grads(ps, grads[N])
    adamw.step()
    t = N + 1
    for i, (a, (theta, m, v)) in enumerate(zip(ps, before)):  # Adam's step, written out
        lr, wd = (2e-2, 0.1) if i < 2 else (5e-3, 0.0)
        g = grads[N][i]
        m = 0.8 * m + 0.2 * g
        v = 0.99 * v + 0.01 * g * g
        expected = theta * (1 - lr * wd) - lr / (1 - 0.8 ** t) * m / ((v / (1 - 0.99 ** t)).sqrt() + 1e-6)
        close(a, expected)


def test_round_trip_keeps_moments_and_steps():
    init, grads = problem(N)
    ps = leaves(init)
    a = AdaMod(groups(ps), backend="reference")
    sm.run_steps(a, ps, grads)
    b = MADA(groups(ps), backend="reference", **dict(CORNER, rho=0.5))
    b.load_state_dict(from_adam(to_adamw(a), b))
    for p in ps:
        assert int(b.state[p]["step"]) == N
        for key in ("m", "v"):
            assert torch.equal(b.state[p][key], a.state[p][key])


def test_params_without_adam_state_stay_without_state():
    init, grads = problem(N + 1)
    ps = leaves(init)
    adamw = torch.optim.AdamW(groups(ps))
    sm.run_steps(adamw, ps, [[g if i != 1 else None for i, g in enumerate(gs)] for gs in grads[:N]])
    opt = AdaMod(groups(ps), backend="reference")
    opt.load_state_dict(from_adam(adamw.state_dict(), opt))
    assert ps[1] not in opt.state and int(opt.state[ps[0]]["step"]) == N
    sm.run_steps(opt, ps, grads[N:])
    assert int(opt.state[ps[1]]["step"]) == 1 and int(opt.state[ps[0]]["step"]) == N + 1


def test_old_adam_state_dict_with_number_steps():
    """torch < 1.12 saved step as a Python int; convert and load it."""
    init, grads = problem(N + K)
    _, whole = adamw_run(init, grads)
    adamw, ps = adamw_run(init, grads[:N])
    sd = copy.deepcopy(adamw.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    opt = MADA(groups(ps), backend="reference", **CORNER)
    opt.load_state_dict(from_adam(sd, opt))
    sm.run_steps(opt, ps, grads[N:])
    for a, b in zip(ps, whole):
        close(a, b)


def _amsgrad(sd):
    sd["param_groups"][0]["amsgrad"] = True


def _l2(sd):
    sd["param_groups"][1]["decoupled_weight_decay"] = False
    sd["param_groups"][1]["weight_decay"] = 0.01


def _betas(sd):
    sd["param_groups"][1]["betas"] = (0.9, 0.99)


def _maximize(sd):
    sd["param_groups"][0]["maximize"] = True


def _group_sizes(sd):
    sd["param_groups"][0]["params"].append(sd["param_groups"][1]["params"].pop())


def _unknown_id(sd):
    sd["state"][99] = sd["state"][0]


def _missing_moment(sd):
    del sd["state"][2]["exp_avg_sq"]


def _wrong_shape(sd):
    sd["state"][0]["exp_avg"] = torch.zeros(4)


def _bad_step(sd):
    sd["state"][1]["step"] = torch.tensor(-2.0)


@pytest.mark.parametrize("corrupt", [_amsgrad, _l2, _betas, _maximize, _group_sizes, _unknown_id,
                                     _missing_moment, _wrong_shape, _bad_step])
def test_misfits_are_refused_and_change_nothing(corrupt):
    init, grads = problem(N)
    adamw, ps = adamw_run(init, grads[:2])
    opt = MADA(groups(ps), backend="reference", **CORNER)
    sm.run_steps(opt, ps, grads[2:])
    snap = sm.snapshot(opt, ps)
    sd = copy.deepcopy(adamw.state_dict())
    corrupt(sd)
    with pytest.raises(ValueError):
        opt.load_state_dict(from_adam(sd, opt))
    sm.assert_unchanged(snap, opt, ps)


def test_adam_without_weight_decay_converts():
    """torch.optim.Adam (coupled L2 decay) is fine when it has no decay."""
    init, grads = problem(N + K)
    plain = lambda ps: [dict(params=ps[:2], lr=2e-2), dict(params=ps[2:], lr=5e-3)]  # noqa: E731
    whole = leaves(init)
    sm.run_steps(torch.optim.AdamW(plain(whole), weight_decay=0.0), whole, grads)
    ps = leaves(init)
    adam = torch.optim.Adam(plain(ps))
    sm.run_steps(adam, ps, grads[:N])
    opt = MADA(groups(ps), backend="reference", **CORNER)
    opt.load_state_dict(from_adam(adam.state_dict(), opt))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    sm.run_steps(opt, ps, grads[N:])
    for a, b in zip(ps, whole):
        close(a, b)


# --------------------------------------------------------------------------- #
# load_state_dict: step as a Python number or an integer tensor
# --------------------------------------------------------------------------- #

STEP_FORMS = {
    "int": int,
    "float": float,
    "int64-tensor": lambda s: torch.tensor(int(s)),
    "float32-tensor": lambda s: torch.tensor(float(s), dtype=torch.float32),
}


@pytest.mark.parametrize("form", list(STEP_FORMS))
@pytest.mark.parametrize("cls,kw", [(MADA, dict(beta3=0.3, rho=0.5, hyper_warmup=0)), (AdaMod, {})],
                         ids=["mada", "adamod"])
def test_number_step_loads_and_continues_bit_exactly(cls, kw, form):
    init, grads = problem(6)
    pa = leaves(init)
    a = cls(groups(pa), backend="reference", **kw)
    sm.run_steps(a, pa, grads[:3])
    pb = leaves(pa)
    sd = copy.deepcopy(a.state_dict())
    for st in sd["state"].values():
        st["step"] = STEP_FORMS[form](st["step"])
    b = cls(groups(pb), backend="reference", **kw)
    b.load_state_dict(sd)
    for p in pb:
        step = b.state[p]["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float64 and float(step) == 3.0
    sm.deep_equal(a.state_dict(), b.state_dict(), "state_dict after load")
    sm.run_steps(a, pa, grads[3:])
    sm.run_steps(b, pb, grads[3:])
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


BAD_STEPS = [-1, -1.0, 2.5, float("nan"), float("inf"), 10**400, True, "3", None, [3],
             torch.tensor(-1), torch.tensor(2.5), torch.tensor([3.0]), torch.tensor(True)]


@pytest.mark.parametrize("bad", BAD_STEPS, ids=[repr(b) for b in BAD_STEPS])
def test_bad_step_is_refused_and_changes_nothing(bad):
    init, grads = problem(3)
    ps = leaves(init)
    opt = AdaMod(groups(ps), backend="reference")
    sm.run_steps(opt, ps, grads[:2])
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["step"] = bad
    snap = sm.snapshot(opt, ps)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    sm.assert_unchanged(snap, opt, ps)


@pytest.mark.parametrize("cls", [MADA, AVGrad])
def test_per_group_options_carry_over(cls):
    """What the target takes per group (MADA: eps; AVGrad: betas, eps too) comes from Adam's group."""
    init, grads = problem(N)
    adamw, ps = adamw_run(init, grads[:2])
    sd = copy.deepcopy(adamw.state_dict())
    sd["param_groups"][0]["eps"] = 1e-6
    opt = cls(groups(ps), backend="reference")
    opt.load_state_dict(from_adam(sd, opt))
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[1]["eps"] == sd["param_groups"][1]["eps"]
