"""Independent executable model of docs/spec.md, for the tests only.

Written from the spec's text, never importing anything from ``mada_fused``.
Everything is float64 and differentiable: MADA's coefficients are passed as
torch tensors (0-dim, or entries of a 6-vector) so that autograd / forward-mode
AD can differentiate the update ``u`` with respect to them.

One call = one optimizer step for one parameter tensor.
"""
from __future__ import annotations

import copy
import math

import torch

CANON = ("beta1", "beta2", "beta3", "rho", "c", "gamma")

DEFAULT_BOUNDS = {
    "beta1": (0.0, 0.999),
    "beta2": (0.5, 0.9999),
    "beta3": (0.0, 0.99),
    "rho": (0.0, 1.0),
    "c": (0.0, 1.0),
    "gamma": (0.0, 1.0),
}
PAPER_BOUNDS = dict(DEFAULT_BOUNDS, beta1=(0.01, 0.99), beta2=(0.501, 0.99), beta3=(0.0, 0.99))
DEFAULT_HYPER_LR = {"beta1": 5e-4, "beta2": 5e-4, "beta3": 1e-1, "rho": 1e-1, "c": 1e-1, "gamma": 1e-1}
MADA_MOMENTS = ("m", "v", "n", "g_prev", "l", "vb", "s")


def kvec(coeffs: dict, requires_grad: bool = False) -> torch.Tensor:
    """The six coefficients, canonical order, as one float64 vector."""
    return torch.tensor([float(coeffs[n]) for n in CANON], dtype=torch.float64, requires_grad=requires_grad)


def kdict(vec: torch.Tensor) -> dict:
    return {n: vec[i] for i, n in enumerate(CANON)}


def _as_t(x):
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def mada_init_state(theta: torch.Tensor) -> dict:
    z = torch.zeros_like(theta, dtype=torch.float64)
    return {"step": 0, **{k: z.clone() for k in MADA_MOMENTS if k != "g_prev"}, "g_prev": None}


def held(x, dtype=None):
    """x as an implementation in ``dtype`` holds it: the nearest ``dtype`` number, as a float64
    tensor whose forward-mode tangent is x's (None: x itself)."""
    x = _as_t(x)
    if dtype is None:
        return x
    return x + (x.detach().to(dtype).to(torch.float64) - x.detach())


def mada_step(theta, g, state, k, *, lr, weight_decay=0.0, eps=1e-8, mod_beta=0.0,
              lion_betas=(0.95, 0.98), vbar="full", maximize=False, const_dtype=None):
    """docs/spec.md section 1, one step.

    theta, g: float64 tensors (constants).  state: dict from ``mada_init_state`` or a
    previous call (treated as constants: one-step truncation).  k: dict name -> 0-dim
    tensor (may require grad / carry forward-mode tangents).
    ``const_dtype``: evaluate with the constants an implementation in that dtype holds
    (coefficients, betas, lr, eps and the decay factor rounded to it), the powers beta^t
    still from the float64 coefficients.
    Returns (theta_new, new_state, u, aux) where aux holds eta, s for clip checks.
    """
    t = state["step"] + 1
    g = g.detach().to(torch.float64)
    if maximize:
        g = -g
    pw1, pw2 = _as_t(k["beta1"]), _as_t(k["beta2"])  # for the powers only
    beta1, beta2, beta3, rho, c, gamma = (held(k[n], const_dtype) for n in CANON)
    lb1, lb2 = (held(b, const_dtype) for b in lion_betas)
    eps, lr_e, mod_beta = held(eps, const_dtype), held(lr, const_dtype), held(mod_beta, const_dtype)
    decay = held(1 - lr * weight_decay, const_dtype)
    m_, v_, n_, l_, vb_, s_ = (state[x].detach() for x in ("m", "v", "n", "l", "vb", "s"))
    g_prev = g if state["g_prev"] is None else state["g_prev"].detach()

    d = g - g_prev
    gh = g + beta3 * d
    gh2 = gh * gh
    sg = torch.sign(gh2 - v_).detach()
    G = c * gh2 + (1 - c) * (v_ + sg * gh2)
    m = beta1 * m_ + (1 - beta1) * g
    v = beta2 * v_ + (1 - beta2) * G
    n = beta3 * n_ + (1 - beta3) * d
    uL = lb1 * l_ + (1 - lb1) * g
    l = lb2 * l_ + (1 - lb2) * g
    vb = ((t - 1) * vb_ + v) / t
    B1 = 1 - pw1 ** t
    B2 = 1 - pw2 ** t
    vb_used = vb.detach() if vbar == "detach" else vb
    N = rho * v + (1 - rho) * vb_used
    vh = N / B2
    A = m / B1 + beta3 * n
    D = torch.sqrt(vh) + eps
    eta = lr_e / D
    if mod_beta > 0:
        s = mod_beta * s_ + (1 - mod_beta) * eta
        etah = torch.where(eta <= s, eta, s)
    else:
        s = s_
        etah = eta
    u = gamma * etah * A + (1 - gamma) * lr_e * torch.sign(uL).detach()
    theta_new = theta.detach().to(torch.float64) * decay - u
    new_state = {"step": t, "m": m, "v": v, "n": n, "l": l, "vb": vb, "s": s, "g_prev": g.clone()}
    return theta_new, new_state, u, {"eta": eta, "s": s}


def detach_state(state: dict) -> dict:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def mada_tangents(theta, g, state, coeffs: dict, names=CANON, **kw) -> torch.Tensor:
    """du/dk per element for each name in ``names`` (canonical order assumed by caller),
    by forward-mode AD through ``mada_step`` (one dual pass per coefficient).
    Shape (len(names), *theta.shape)."""
    import torch.autograd.forward_ad as fwAD

    rows = []
    for name in names:
        with fwAD.dual_level():
            k = {n: torch.tensor(float(coeffs[n]), dtype=torch.float64) for n in CANON}
            k[name] = fwAD.make_dual(k[name], torch.ones((), dtype=torch.float64))
            u = mada_step(theta, g, state, k, **kw)[2]
            tangent = fwAD.unpack_dual(u).tangent
            rows.append(torch.zeros_like(u.detach()) if tangent is None else tangent.clone())
    return torch.stack(rows)


def project(name: str, value: float, bounds: dict) -> float:
    lo, hi = bounds[name]
    return min(max(value, lo), hi)


# --------------------------------------------------------------------------- #
# Plain reference optimizers (no autograd needed)
# --------------------------------------------------------------------------- #

def adamod_step(theta, g, state, *, lr, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.0,
                diff_friction=False, const_dtype=None):
    """docs/spec.md section 3 (AdaMod as released), plus section 4's diffGrad friction when asked.
    ``const_dtype``: as in :func:`mada_step` (the step size lr sqrt(B2) / B1 is one constant)."""
    b1, b2 = betas
    t = state.get("step", 0) + 1
    g = g.to(torch.float64)
    z = torch.zeros_like(theta, dtype=torch.float64)
    m_ = state.get("m", z)
    v_ = state.get("v", z)
    s_ = state.get("s", z)
    step_size = held(lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t), const_dtype)
    b1, b2, beta3, eps = (held(x, const_dtype) for x in (b1, b2, beta3, eps))
    m = b1 * m_ + (1 - b1) * g
    v = b2 * v_ + (1 - b2) * g * g
    eta = step_size / (torch.sqrt(v) + eps)
    theta = theta * held(1 - lr * weight_decay, const_dtype)
    s = beta3 * s_ + (1 - beta3) * eta
    step_m = m
    if diff_friction:
        g_prev = state.get("g_prev", z)
        xi = 1.0 / (1.0 + torch.exp(-torch.abs(g_prev - g)))
        step_m = m * xi
    theta = theta - torch.minimum(eta, s) * step_m
    return theta, {"step": t, "m": m, "v": v, "s": s, "g_prev": g.clone()}


def diffmod_step(theta, g, state, *, lr, betas=(0.9, 0.999), len_memory=1000, eps=1e-8, weight_decay=0.0):
    """docs/spec.md section 4."""
    return adamod_step(theta, g, state, lr=lr, betas=betas, beta3=1 - 1 / len_memory, eps=eps,
                       weight_decay=weight_decay, diff_friction=True)


def avgrad_step(theta, g, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """AVGrad written directly (Adam moments, running mean of v, AdamW-style decay)."""
    b1, b2 = betas
    t = state.get("step", 0) + 1
    z = torch.zeros_like(theta, dtype=torch.float64)
    m = b1 * state.get("m", z) + (1 - b1) * g
    v = b2 * state.get("v", z) + (1 - b2) * g * g
    vb = state.get("vb", z) + (v - state.get("vb", z)) / t
    theta = theta * (1 - lr * weight_decay)
    theta = theta - lr * (m / (1 - b1 ** t)) / (torch.sqrt(vb / (1 - b2 ** t)) + eps)
    return theta, {"step": t, "m": m, "v": v, "vb": vb}


def lion_step(theta, g, state, *, lr, betas=(0.95, 0.98), weight_decay=0.0):
    """Lion (Chen et al. 2023), Algorithm 2."""
    b1, b2 = betas
    mom = state.get("mom", torch.zeros_like(theta))
    cdir = b1 * mom + (1 - b1) * g
    theta = theta * (1 - lr * weight_decay) - lr * torch.sign(cdir)
    return theta, {"mom": b2 * mom + (1 - b2) * g}


# --------------------------------------------------------------------------- #
# Small test helpers (no optimizer math here)
# --------------------------------------------------------------------------- #

def set_grads(params, grads):
    """Give each param a fresh copy of its grad (None stays None)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def mada_kwargs(coeffs) -> dict:
    """MADA constructor arguments that start it at the coefficients ``coeffs`` (name -> value)."""
    return dict(betas=(coeffs["beta1"], coeffs["beta2"]), beta3=coeffs["beta3"], rho=coeffs["rho"],
                c=coeffs["c"], gamma=coeffs["gamma"])


def run_steps(opt, params, grad_seq):
    for grads in grad_seq:
        set_grads(params, grads)
        opt.step()


def deep_equal(a, b, path="") -> None:
    """Recursive exact equality of nested dict/list/tuple/tensor/float structures
    (tensors via torch.equal plus dtype/shape; NaN == NaN for floats)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(1.2345), b.nan_to_num(1.2345))), \
            f"{path}: tensors differ (max abs diff {(a.double() - b.double()).abs().max().item() if a.numel() else 0})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            deep_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            deep_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(snap, opt, params):
    ps, sd = snap
    for i, (a, p) in enumerate(zip(ps, params)):
        assert torch.equal(a, p.detach()), f"param {i} changed"
    deep_equal(sd, opt.state_dict(), "state_dict")


class MadaSim:
    """docs/spec.md section 1 over a list of tensors (each with its own group lr / weight decay),
    plus section 2's hyper-gradient by reverse-mode autograd through the last step.

    ``step(grads, k)`` takes k as a 6-vector in canonical order; if it requires grad, the
    graph of every u is kept so that ``hypergrad(next_grads, k)`` can differentiate
    h_k = -sum g_next * du/dk.  The previous state is detached at every step.
    """

    def __init__(self, thetas, lrs, wds, *, eps=1e-8, mod_beta=0.0, lion_betas=(0.95, 0.98),
                 vbar="full", maximize=False):
        self.thetas = [t.detach().to(torch.float64).clone() for t in thetas]
        self.lrs, self.wds = list(lrs), list(wds)
        self.kw = dict(eps=eps, mod_beta=mod_beta, lion_betas=lion_betas, vbar=vbar, maximize=maximize)
        self.states = [mada_init_state(t) for t in self.thetas]
        self.maximize = maximize
        self.last = None

    def step(self, grads, k: torch.Tensor):
        kd = kdict(k)
        us, auxs, inputs = [], [], []
        for i, g in enumerate(grads):
            g = g.detach().to(torch.float64)
            inputs.append((self.thetas[i], g, self.states[i]))
            th, st, u, aux = mada_step(self.thetas[i], g, self.states[i], kd, lr=self.lrs[i],
                                       weight_decay=self.wds[i], **self.kw)
            self.thetas[i] = th.detach()
            self.states[i] = detach_state(st)
            us.append(u)
            auxs.append({a: b.detach() for a, b in aux.items()})
        self.last = {"us": us, "aux": auxs, "inputs": inputs, "k": k.detach().clone()}
        return self.thetas

    def hypergrad(self, next_grads, k: torch.Tensor) -> torch.Tensor:
        """h (6-vector, canonical order) for the last step's u, given the next step's grads."""
        total = 0.0
        for u, g in zip(self.last["us"], next_grads):
            g = g.detach().to(torch.float64)
            if self.maximize:
                g = -g
            total = total + (g * u).sum()
        (gk,) = torch.autograd.grad(total, k, allow_unused=True)
        return -gk if gk is not None else torch.zeros(6, dtype=torch.float64)

    def hyper_terms_abs(self, next_grads) -> torch.Tensor:
        """sum |g_next * du/dk| per coefficient (a scale for tolerances), via forward AD."""
        out = torch.zeros(6, dtype=torch.float64)
        for i, gn in enumerate(next_grads):
            out += (self.tangents(i) * gn.detach().to(torch.float64)).abs().flatten(1).sum(1)
        return out

    def tangents(self, i: int, names=CANON) -> torch.Tensor:
        """du/dk of the last step for tensor i (forward-mode AD, cached per step)."""
        cache = self.last.setdefault("tangents", {})
        if i not in cache:
            th, g, st = self.last["inputs"][i]
            kd = {n: float(self.last["k"][j]) for j, n in enumerate(CANON)}
            cache[i] = mada_tangents(th, g, st, kd, lr=self.lrs[i], weight_decay=self.wds[i], **self.kw)
        return torch.stack([cache[i][CANON.index(n)] for n in names])


def hyper_settings(kwargs: dict) -> dict:
    """MADA's hyper-gradient descent settings (SPEC section 2) from its constructor arguments."""
    bounds = kwargs.get("bounds")
    box = dict(PAPER_BOUNDS if bounds == "paper" else DEFAULT_BOUNDS)
    if isinstance(bounds, dict):
        box.update(bounds)
    clip = kwargs.get("hyper_clip", 10.0)
    return dict(rates={**DEFAULT_HYPER_LR, **(kwargs.get("hyper_lr") or {})}, bounds=box,
                clip=math.inf if clip is None else clip, warmup=kwargs.get("hyper_warmup", 50))


def hyper_update(coeffs: dict, h: dict, settings: dict) -> dict:
    """SPEC section 2's hyper-update: clipped SGD on the learned coefficients (the keys of h),
    projected to their boxes."""
    out = dict(coeffs)
    clip = settings["clip"]
    for n, hn in h.items():
        out[n] = project(n, coeffs[n] - settings["rates"][n] * min(max(hn, -clip), clip), settings["bounds"])
    return out
