"""docs/spec.md sections 1, 3, 4: the reference backend against independent expectations, in float64.

First two tests check the test model itself (spec_model) against docs/spec.md section 2.2's closed forms
and against torch.optim.AdamW, so that the model can be trusted as the oracle below.
"""
from __future__ import annotations

import pytest
import torch

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod

CORNER = dict(beta3=0.0, rho=1.0, c=1.0, gamma=1.0, mod_beta=0.0, learn=())
RTOL, ATOL = 1e-12, 1e-14


def close(a, b, rtol=RTOL, atol=ATOL, msg=""):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol, msg=msg or None)


def interior_coeffs():
    """Random coefficients strictly inside their default boxes (away from the corners)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(()).item()
    return dict(beta1=u(0.5, 0.95), beta2=u(0.9, 0.999), beta3=u(0.05, 0.9), rho=u(0.1, 0.9),
                c=u(0.1, 0.9), gamma=u(0.1, 0.9))


def two_groups(params, lrs=(1e-2, 3e-3), wds=(0.1, 0.01)):
    """Split params into two groups; returns (param_groups, per-param lr list, per-param wd list)."""
    h = len(params) // 2
    groups = [dict(params=params[:h], lr=lrs[0], weight_decay=wds[0]),
              dict(params=params[h:], lr=lrs[1], weight_decay=wds[1])]
    per_lr = [lrs[0]] * h + [lrs[1]] * (len(params) - h)
    per_wd = [wds[0]] * h + [wds[1]] * (len(params) - h)
    return groups, per_lr, per_wd


# --------------------------------------------------------------------------- #
# The oracle itself
# --------------------------------------------------------------------------- #

def closed_form_tangents(theta, g, st, k, lr, eps, mod_beta, vbar, lion_betas=(0.95, 0.98)):
    """docs/spec.md section 2.2 closed forms, typed in literally (canonical order)."""
    b1, b2, b3, rho, c, gamma = (k[n] for n in sm.CANON)
    t = st["step"] + 1
    gp = st["g_prev"] if st["g_prev"] is not None else g
    d = g - gp
    gh = g + b3 * d
    sg = torch.sign(gh ** 2 - st["v"])
    G = c * gh ** 2 + (1 - c) * (st["v"] + sg * gh ** 2)
    m = b1 * st["m"] + (1 - b1) * g
    v = b2 * st["v"] + (1 - b2) * G
    n = b3 * st["n"] + (1 - b3) * d
    uL = lion_betas[0] * st["l"] + (1 - lion_betas[0]) * g
    vb = ((t - 1) * st["vb"] + v) / t
    B1, B2 = 1 - b1 ** t, 1 - b2 ** t
    N = rho * v + (1 - rho) * vb
    vh = N / B2
    A = m / B1 + b3 * n
    D = torch.sqrt(vh) + eps
    eta = lr / D
    if mod_beta > 0:
        s = mod_beta * st["s"] + (1 - mod_beta) * eta
        clip = eta > s
        etah = torch.where(clip, s, eta)
        om = torch.where(clip, torch.full_like(eta, 1 - mod_beta), torch.ones_like(eta))
    else:
        etah, om = eta, torch.ones_like(eta)
    w = rho + (1 - rho) / t if vbar == "full" else rho
    deta = -lr / (2 * torch.sqrt(vh) * D ** 2)
    dvh_b2 = w * (st["v"] - G) / B2 + t * b2 ** (t - 1) * N / B2 ** 2
    dvh_c = w * (1 - b2) * (gh ** 2 - st["v"] - sg * gh ** 2) / B2
    dvh_b3 = w * (1 - b2) * (c + (1 - c) * sg) * 2 * gh * d / B2
    dvh_rho = (v - vb) / B2
    dA_b1 = (st["m"] - g) / B1 + t * b1 ** (t - 1) * m / B1 ** 2
    dA_b3 = n + b3 * (st["n"] - d)
    return torch.stack([
        gamma * etah * dA_b1,
        gamma * om * deta * dvh_b2 * A,
        gamma * (om * deta * dvh_b3 * A + etah * dA_b3),
        gamma * om * deta * dvh_rho * A,
        gamma * om * deta * dvh_c * A,
        etah * A - lr * torch.sign(uL),
    ])


@pytest.mark.parametrize("vbar", ["full", "detach"])
@pytest.mark.parametrize("mod_beta", [0.0, 0.6])
def test_oracle_autograd_matches_spec_closed_forms(vbar, mod_beta):
    coeffs = interior_coeffs()
    theta = torch.randn(40)
    st = sm.mada_init_state(theta)
    lr, eps = 3e-3, 1e-8
    clipped_seen = unclipped_seen = False
    for step in range(5):
        g = torch.randn(40) * torch.exp(torch.randn(40))
        tang = sm.mada_tangents(theta, g, st, coeffs, lr=lr, eps=eps, mod_beta=mod_beta, vbar=vbar)
        ref = closed_form_tangents(theta, g, st, coeffs, lr, eps, mod_beta, vbar)
        # analytically-zero entries (e.g. du/dbeta1 at t = 1) come out as rounding noise of the
        # size of the individual terms, ~ lr / (1 - beta)
        scale = lr / min(1 - coeffs["beta1"], 1 - coeffs["beta2"])
        close(tang, ref, rtol=1e-9, atol=1e-13 * scale, msg=f"step {step + 1}")
        theta, st, _, aux = sm.mada_step(theta, g, st, coeffs, lr=lr, eps=eps, mod_beta=mod_beta, vbar=vbar)
        st = sm.detach_state(st)
        if mod_beta:
            clipped_seen |= bool((aux["eta"] > aux["s"]).any())
            unclipped_seen |= bool((aux["eta"] <= aux["s"]).any())
    if mod_beta:
        assert clipped_seen and unclipped_seen


def test_oracle_adam_corner_matches_adamw():
    p = torch.randn(17, requires_grad=True)
    ref = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    theta, st = p.detach().clone(), sm.mada_init_state(p)
    k = dict(beta1=0.9, beta2=0.999, beta3=0.0, rho=1.0, c=1.0, gamma=1.0)
    for _ in range(8):
        g = torch.randn(17)
        p.grad = g.clone()
        ref.step()
        theta, st, _, _ = sm.mada_step(theta, g, st, k, lr=1e-2, weight_decay=0.1)
        close(theta, p)


# --------------------------------------------------------------------------- #
# MADA special cases against torch.optim and hand-written optimizers
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_corner_equals_torch_adam_adamw(two_layer, wd, maximize):
    p_m, p_t = two_layer.params(), two_layer.params()
    lrs, wds = (1e-2, 4e-3), (wd, 3 * wd)
    g_m, _, _ = two_groups(p_m, lrs, wds)
    g_t, _, _ = two_groups(p_t, lrs, wds)
    opt = MADA(g_m, betas=(0.85, 0.995), eps=1e-7, maximize=maximize, backend="reference", **CORNER)
    if wd == 0:
        ref = torch.optim.Adam(g_t, betas=(0.85, 0.995), eps=1e-7, maximize=maximize)
    else:
        ref = torch.optim.AdamW(g_t, betas=(0.85, 0.995), eps=1e-7, maximize=maximize)
    for step in range(20):
        for o, ps in ((opt, p_m), (ref, p_t)):
            o.zero_grad()
            two_layer.loss(ps).backward()
            o.step()
        for a, b in zip(p_m, p_t):
            close(a, b, msg=f"step {step + 1}")
    for p, q in zip(p_m, p_t):
        close(opt.state[p]["m"], ref.state[q]["exp_avg"])
        close(opt.state[p]["v"], ref.state[q]["exp_avg_sq"])
        assert int(opt.state[p]["step"]) == 20


@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_rho0_is_avgrad(make_params, make_grads, wd):
    params = make_params()
    grads = make_grads(params, 12)
    p_mada = [p.detach().clone().requires_grad_() for p in params]
    p_avg = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd)
    opt = MADA(p_mada, **kw, **dict(CORNER, rho=0.0), backend="reference")
    avg = AVGrad(p_avg, **kw, backend="reference")
    thetas = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    model = sm.MadaSim(params, [kw["lr"]] * 4, [wd] * 4, eps=1e-8)
    k = sm.kvec(dict(beta1=0.8, beta2=0.99, beta3=0.0, rho=0.0, c=1.0, gamma=1.0))
    for step, gs in enumerate(grads):
        sm.set_grads(p_mada, gs)
        sm.set_grads(p_avg, gs)
        opt.step()
        avg.step()
        model.step(gs, k)
        for i, g in enumerate(gs):
            thetas[i], states[i] = sm.avgrad_step(thetas[i], g, states[i], **kw)
        for i in range(len(params)):
            close(p_mada[i], thetas[i], msg=f"MADA(rho=0) vs AVGrad formula, step {step + 1}")
            close(p_avg[i], thetas[i], msg=f"AVGrad class vs AVGrad formula, step {step + 1}")
            close(model.thetas[i], thetas[i], msg="oracle vs AVGrad formula")
    for i, p in enumerate(p_mada):
        close(opt.state[p]["vb"], states[i]["vb"])


@pytest.mark.parametrize("lion_betas", [(0.95, 0.98), (0.9, 0.99)])
def test_gamma0_is_lion(make_params, make_grads, lion_betas):
    params = make_params()
    grads = make_grads(params, 10)
    groups, lrs, wds = two_groups(params, (1e-2, 2e-3), (0.1, 0.0))
    init = [p.detach().clone() for p in params]
    # gamma = 0 must make the Adan/Adam part irrelevant: use non-trivial values for the rest
    opt = MADA(groups, betas=(0.7, 0.95), beta3=0.3, rho=0.4, c=0.6, gamma=0.0, lion_betas=lion_betas,
               learn=(), backend="reference")
    thetas, states = init, [{} for _ in params]
    for step, gs in enumerate(grads):
        sm.set_grads(params, gs)
        opt.step()
        for i, g in enumerate(gs):
            thetas[i], states[i] = sm.lion_step(thetas[i], g, states[i], lr=lrs[i], betas=lion_betas,
                                                weight_decay=wds[i])
            close(params[i], thetas[i], msg=f"step {step + 1}")
    assert all(int(opt.state[p]["step"]) == 10 for p in params)


# --------------------------------------------------------------------------- #
# Full MADA, interior coefficients
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("mod_beta", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("how", ["learn_none", "learn_all_warmup"])
def test_full_mada_matches_oracle(make_params, make_grads, mod_beta, maximize, how):
    params = make_params()
    grads = make_grads(params, 10)
    groups, lrs, wds = two_groups(params, (5e-3, 1.5e-2), (0.02, 0.1))
    coeffs = interior_coeffs()
    extra = dict(learn=()) if how == "learn_none" else dict(hyper_warmup=10 ** 6)
    opt = MADA(groups, eps=1e-6, mod_beta=mod_beta, maximize=maximize, lion_betas=(0.9, 0.97),
               backend="reference", **sm.mada_kwargs(coeffs), **extra)
    model = sm.MadaSim(params, lrs, wds, eps=1e-6, mod_beta=mod_beta, maximize=maximize, lion_betas=(0.9, 0.97))
    k = sm.kvec(coeffs)
    for step, gs in enumerate(grads):
        sm.set_grads(params, gs)
        opt.step()
        model.step(gs, k)
        for i, p in enumerate(params):
            close(p, model.thetas[i], msg=f"param {i} step {step + 1}")
        for name, val in opt.coefficients.items():
            assert val == coeffs[name], f"{name} moved although it is fixed"
    # the moments the configuration reads are docs/spec.md section 1.2's
    for i, p in enumerate(params):
        # (g' is compared only for maximize=False: storing it un-negated is an equivalent choice)
        for key in ("m", "v", "n", "l", "vb") + (("s",) if mod_beta else ()) + (() if maximize else ("g_prev",)):
            close(opt.state[p][key], model.states[i][key], msg=f"state {key} of param {i}")


@pytest.mark.parametrize("mod_beta", [0.0, 0.8])
def test_learning_on_replay_coefficients(make_params, make_grads, mod_beta):
    """hyper_order="lagged": the coefficients read before step() are the ones step() uses."""
    params = make_params()
    grads = make_grads(params, 10)
    groups, lrs, wds = two_groups(params, (5e-3, 1e-2), (0.0, 0.05))
    coeffs = interior_coeffs()
    opt = MADA(groups, mod_beta=mod_beta, hyper_warmup=0, hyper_order="lagged",
               hyper_lr={n: 0.02 for n in sm.CANON}, backend="reference", **sm.mada_kwargs(coeffs))
    model = sm.MadaSim(params, lrs, wds, mod_beta=mod_beta)
    seen = []
    for step, gs in enumerate(grads):
        k_now = dict(opt.coefficients)
        seen.append(k_now)
        sm.set_grads(params, gs)
        opt.step()
        model.step(gs, sm.kvec(k_now))
        for i, p in enumerate(params):
            close(p, model.thetas[i], rtol=1e-11, msg=f"param {i} step {step + 1}")
    assert any(seen[-1][n] != coeffs[n] for n in sm.CANON), "coefficients never moved: test is vacuous"


# --------------------------------------------------------------------------- #
# AdaMod / DiffMod (docs/spec.md sections 3, 4)
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("cls", ["AdaMod", "DiffMod"])
@pytest.mark.parametrize("cfg", [
    dict(),  # defaults
    dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, extra=dict(beta3=0.9, len_memory=10)),
])
def test_adamod_diffmod(make_params, make_grads, cls, cfg):
    params = make_params()
    grads = make_grads(params, 12)
    cfg = dict(cfg)
    extra = cfg.pop("extra", {})
    if cfg:
        groups, lrs, wds = two_groups(params, (1e-2, 3e-3), (cfg["weight_decay"], 2 * cfg["weight_decay"]))
        cfg.pop("weight_decay")
    else:
        groups, lrs, wds = params, [1e-3] * len(params), [0.0] * len(params)
    if cls == "AdaMod":
        ckw = dict(beta3=extra["beta3"]) if extra else {}
        opt = AdaMod(groups, backend="reference", **cfg, **ckw)
        fn = lambda th, g, st, lr, wd: sm.adamod_step(th, g, st, lr=lr, weight_decay=wd, **cfg, **ckw)
    else:
        ckw = dict(len_memory=extra["len_memory"]) if extra else {}
        opt = DiffMod(groups, backend="reference", **cfg, **ckw)
        fn = lambda th, g, st, lr, wd: sm.diffmod_step(th, g, st, lr=lr, weight_decay=wd, **cfg, **ckw)
    thetas, states = [p.detach().clone() for p in params], [{} for _ in params]
    for step, gs in enumerate(grads):
        sm.set_grads(params, gs)
        opt.step()
        for i, g in enumerate(gs):
            thetas[i], states[i] = fn(thetas[i], g, states[i], lrs[i], wds[i])
            close(params[i], thetas[i], msg=f"{cls} param {i} step {step + 1}")
    keys = {"step", "m", "v", "s"} | ({"g_prev"} if cls == "DiffMod" else set())
    for i, p in enumerate(params):
        assert set(opt.state[p]) == keys
        for key in keys - {"step"}:
            close(opt.state[p][key], states[i][key], msg=f"{cls} state {key}")


@pytest.mark.parametrize("cls", ["DiffMod", "MADA"])
def test_previous_grad_is_a_copy(make_params, cls):
    """g' must be a copy: mutating p.grad in place after step() must not change the next step."""
    params = make_params([(4, 3)])
    p = params[0]
    theta, st = p.detach().clone(), {}
    g1, g2 = torch.randn(4, 3), torch.randn(4, 3)
    if cls == "DiffMod":
        opt = DiffMod(params, lr=1e-2, len_memory=5, backend="reference")
        ref = lambda th, g, st: sm.diffmod_step(th, g, st, lr=1e-2, len_memory=5)
    else:
        k = dict(beta1=0.9, beta2=0.99, beta3=0.5, rho=1.0, c=1.0, gamma=1.0)
        opt = MADA(params, lr=1e-2, **sm.mada_kwargs(k), learn=(), backend="reference")
        st = sm.mada_init_state(theta)
        ref = lambda th, g, st: sm.mada_step(th, g, st, k, lr=1e-2)[:2]
    p.grad = g1.clone()
    opt.step()
    theta, st = ref(theta, g1, st)
    p.grad.mul_(0.0).add_(g2)  # reuse the same grad storage, as zero_grad(set_to_none=False) + backward do
    opt.step()
    theta, st = ref(theta, g2, st)
    close(p, theta)


def test_adamod_is_not_adam(make_params, make_grads):
    """Guard against a vacuous AdaMod test: the clip must actually bite with beta3 = 0.999."""
    params = make_params([(50,)])
    p = params[0]
    opt = AdaMod(params, lr=1e-2, backend="reference")
    ref_p = p.detach().clone().requires_grad_()
    adam = torch.optim.Adam([ref_p], lr=1e-2)
    for gs in make_grads(params, 3):
        sm.set_grads(params, gs)
        sm.set_grads([ref_p], gs)
        opt.step()
        adam.step()
    assert not torch.allclose(p, ref_p, rtol=1e-6, atol=0)


def test_backends_share_the_header_pieces():
    """csrc/mada_math.h, backends/reference.py and triton_kernels/kernels.py are split into the
    same named pieces, so a term can be found in all three by one name (mada_element, the
    header's composition of two of them, is each backend's own loop)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def read(*path):
        with open(os.path.join(root, *path)) as f:
            return f.read()

    pieces = set(re.findall(r"^MADA_HD [\w<>]+ ((?:make|mada|adamod)_\w+)\(", read("csrc", "mada_math.h"), re.M))
    pieces.discard("mada_element")
    assert {"make_mada_scalars", "mada_grad_terms", "mada_state_terms", "mada_moments", "mada_apply",
            "make_adamod_scalars", "adamod_element"} <= pieces
    reference, kernels = read("mada_fused", "backends", "reference.py"), read("triton_kernels", "kernels.py")
    for name in sorted(pieces):
        assert re.search(rf"^def {name}\(", reference, re.M), f"reference.py has no {name}"
        assert re.search(rf"^def _{name}\(", kernels, re.M), f"kernels.py has no _{name}"
