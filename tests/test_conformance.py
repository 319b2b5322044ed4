"""Every present backend, on every case of conformance_cases.CASES, in every dtype the case
lists, against the float64 oracle of spec_model.py and against backend="reference".

Each step starts from the backend's own state: the oracle computes the step from a float64
copy of it and a reference optimizer is loaded with it (state_dict), so the comparison is
one step's rounding and the backend's state carries over from step to step by itself.
Compared after every step: parameters, every state buffer and the step counts, tangent rows,
hyper-gradients and coefficients (tolerances: conformance_cases' docstring).
"""
from __future__ import annotations

import math

import pytest
import torch

import spec_model as sm
from conformance_cases import AMP_SCALE, CASES, GROUP2, SKIP_STEP, Case, lognormal, target, tolerance
from mada_fused import MADA, AVGrad, DiffMod
from mada_fused import backends as registry

_SHORT = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def _params():
    return [pytest.param(b, c, d, id=f"{b}-{c.name}-{_SHORT[d]}")
            for b in registry.NAMES for c in CASES.values() if c.applies(b) for d in c.dtypes]


@pytest.fixture
def device(request, monkeypatch):
    backend, dtype = request.node.callspec.params["backend"], request.node.callspec.params["dtype"]
    tgt = target(backend)
    for k, v in tgt.env.items():
        monkeypatch.setenv(k, v)
    if backend not in registry.available():
        pytest.skip(registry.unavailable_reasons()[backend])
    dev = torch.device(tgt.device)
    if not registry.load(backend).supports(dev, dtype):
        pytest.skip(f"{backend} does not step {dtype} on {dev}")
    return dev


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state_eps(dtype):
    return torch.finfo(_state_dtype(dtype)).eps


# -- the run ---------------------------------------------------------------------------------------
def _build(case: Case, backend: str, init, dtype, device):
    ps = [x.to(dtype).to(device).clone().requires_grad_() for x in init]
    half = len(ps) // 2
    lr = case.kwargs.get("lr", 1e-3)
    groups = [dict(params=ps[:half]),
              dict(params=ps[half:], lr=lr * GROUP2["lr_factor"], weight_decay=GROUP2["weight_decay"])]
    return ps, case.cls(groups, backend=backend, **case.kwargs)


def _grads(case: Case, shapes, step, dtype, device):
    """One step's grads (None: no grad), as the case's schedule says."""
    out = []
    for j, s in enumerate(shapes):
        if case.drop and ((step == 1 and j == 0) or (step == 0 and j == len(shapes) - 1)):
            out.append(None)
            continue
        g = (lognormal(s) * (AMP_SCALE if case.amp else 1.0)).to(dtype).to(device)
        if case.amp and step == SKIP_STEP and j == 0 and g.numel():
            g.view(-1)[0] = float("inf")  # what makes GradScaler set found_inf
        if case.strided and g.dim() == 2:
            g = g.t().contiguous().t()
        out.append(g)
    return out


def _feed(opt, ps, grads, case: Case, skip: bool, device):
    for p, g in zip(ps, grads):
        p.grad = None if g is None else g.clone()
    if case.amp:  # what GradScaler hands a fused optimizer: 0-d float32 tensors
        opt.grad_scale = torch.full((), AMP_SCALE, dtype=torch.float32, device=device)
        opt.found_inf = torch.full((), float(skip), dtype=torch.float32, device=device)


def _snapshot(opt, ps):
    """Host float64 copies of everything a step may change."""
    params = [p.detach().double().cpu().clone() for p in ps]
    states = []
    for p in ps:
        st = {n: t.detach().double().cpu().clone() for n, t in opt.state.get(p, {}).items()}
        if "step" in st:
            st["step"] = int(st["step"])
        states.append(st)
    extra = (opt.coefficients, opt.hypergradients) if isinstance(opt, MADA) else ({}, {})
    return params, states, *extra


def test_every_case_has_a_name_and_runs_everywhere():
    assert all(c.applies(b) for c in CASES.values() for b in registry.NAMES), "a case skips a backend"
    assert {c.cls.__name__ for c in CASES.values()} == {"MADA", "AVGrad", "AdaMod", "DiffMod"}


@pytest.mark.parametrize("backend, case, dtype", _params())
def test_conforms(backend, case, dtype, device):
    check(backend, case, dtype, device)


def check(backend: str, case: Case, dtype: torch.dtype, device: torch.device, shapes=None) -> None:
    """Step ``backend`` through ``case`` and compare every step (module docstring). Backend
    tests call it too, e.g. with the Triton autotuner on or more segments than a launch holds."""
    shapes = shapes or target(backend).shapes(case)
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ps, opt = _build(case, backend, init, dtype, device)
    ref = None if backend == "reference" else _build(case, "reference", init, dtype, device)
    lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
    wds = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
    if isinstance(opt, MADA):
        assert opt.coefficients == _initial_coefficients(case)
    counted = 0  # successful steps, for the hyper warm-up
    for i in range(case.steps):
        skip = case.amp and i == SKIP_STEP
        grads = _grads(case, shapes, i, dtype, device)
        pre = _snapshot(opt, ps)
        if ref is not None:  # the reference starts this step where the backend is
            rps, ropt = ref
            ropt.load_state_dict(opt.state_dict())
            with torch.no_grad():
                for a, b in zip(rps, ps):
                    a.copy_(b)
            _feed(ropt, rps, grads, case, skip, device)
            ropt.step()
        _feed(opt, ps, grads, case, skip, device)
        opt.step()
        post = _snapshot(opt, ps)
        where = f"{backend} {case.name} {_SHORT[dtype]} step {i}"
        if skip:
            _assert_unchanged(pre, post, where)
            continue
        g64 = [None if g is None else g.detach().double().cpu() / (AMP_SCALE if case.amp else 1.0) for g in grads]
        counted += 1
        expect = _oracle(case, pre, post, g64, lrs, wds, has_tangents=i > 0, counted=counted,
                         const_dtype=_state_dtype(dtype))
        rpost = None if ref is None else _snapshot(ref[1], ref[0])
        _compare(backend, case, dtype, pre, post, expect, rpost, g64, lrs, where)


def _initial_coefficients(case: Case) -> dict:
    kw = case.kwargs
    b1, b2 = kw.get("betas", (0.9, 0.999))
    if case.cls is AVGrad:
        return dict(beta1=b1, beta2=b2, beta3=0.0, rho=0.0, c=1.0, gamma=1.0)
    return dict(beta1=b1, beta2=b2, beta3=kw.get("beta3", 0.0), rho=kw.get("rho", 1.0), c=kw.get("c", 1.0),
                gamma=kw.get("gamma", 1.0))


# -- the oracle ------------------------------------------------------------------------------------
def _batches(g64, lrs, wds, states):
    """Params with a grad, batched by (lr, weight decay, step count): the oracle is element-wise,
    so each batch is one flat call."""
    out: dict = {}
    for j, g in enumerate(g64):
        if g is not None:
            out.setdefault((lrs[j], wds[j], states[j].get("step", 0)), []).append(j)
    return out.items()


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _unflat(x, like, leading=()):
    out, at = [], 0
    for t in like:
        out.append(x[..., at:at + t.numel()].reshape(*leading, *t.shape))
        at += t.numel()
    return out


def _oracle(case: Case, pre, post, g64, lrs, wds, has_tangents: bool, counted: int, const_dtype) -> dict:
    """Expected post-step params, states, tangents, h and coefficients from the pre-step ones,
    with the constants an implementation in ``const_dtype`` (the state dtype) holds."""
    params, states, coef, _ = pre
    out = dict(params=list(params), states=list(states), tangents={}, h=None, bound=None, coef=coef)
    kw = case.kwargs
    learn = case.learn
    k_step = dict(coef)
    if learn and has_tangents:
        sign = -1.0 if kw.get("maximize") else 1.0
        dot, bound = torch.zeros(len(learn), dtype=torch.float64), torch.zeros(len(learn), dtype=torch.float64)
        for j, g in enumerate(g64):
            if g is not None and "tangents" in states[j]:
                prod = (sign * g).flatten() * states[j]["tangents"].flatten(1)  # exact in float64
                dot, bound = dot + prod.sum(1), bound + prod.abs().sum(1)
        h = {n: -dot[r].item() for r, n in enumerate(learn)}
        settings = sm.hyper_settings(kw)
        new_coef = sm.hyper_update(coef, h, settings) if counted > settings["warmup"] else dict(coef)
        out.update(h=h, bound={n: bound[r].item() for r, n in enumerate(learn)}, coef=new_coef)
        if kw.get("hyper_order") == "exact":  # the step uses the coefficients just learned (the
            k_step = post[2]  # backend's: they are checked against new_coef on their own)
    out["k_step"] = k_step
    for (lr, wd, step), js in _batches(g64, lrs, wds, states):
        theta, g = _flat([params[j] for j in js]), _flat([g64[j] for j in js])
        names = ("m", "v", "s", "g_prev") if not issubclass(case.cls, MADA) else sm.MADA_MOMENTS
        state = {n: _flat([states[j].get(n, torch.zeros_like(params[j])) for j in js]) for n in names}
        state["step"] = step
        if issubclass(case.cls, MADA):
            state["g_prev"] = state["g_prev"] if step else None
            step_kw = dict(lr=lr, weight_decay=wd, eps=kw.get("eps", 1e-8), mod_beta=kw.get("mod_beta", 0.0),
                           vbar=kw.get("vbar", "full"), maximize=kw.get("maximize", False),
                           lion_betas=kw.get("lion_betas", (0.95, 0.98)), const_dtype=const_dtype)
            new_theta, new, _, _ = sm.mada_step(theta, g, state, k_step, **step_kw)
            if learn:
                rows = sm.mada_tangents(theta, g, state, k_step, names=learn, **step_kw)
                out["tangents"].update(zip(js, _unflat(rows, [params[j] for j in js], (len(learn),))))
        else:
            beta3 = 1 - 1 / kw.get("len_memory", 1000) if case.cls is DiffMod else kw.get("beta3", 0.999)
            g_in = -g if kw.get("maximize") else g  # docs/spec.md section 3: maximize negates g
            new_theta, new = sm.adamod_step(theta, g_in, state, lr=lr, betas=kw.get("betas", (0.9, 0.999)),
                                            beta3=beta3, eps=kw.get("eps", 1e-8), weight_decay=wd,
                                            diff_friction=case.cls is DiffMod, const_dtype=const_dtype)
        like = [params[j] for j in js]
        for j, x in zip(js, _unflat(new_theta, like)):
            out["params"][j] = x
        per = {n: _unflat(t, like) for n, t in new.items() if isinstance(t, torch.Tensor)}
        for i, j in enumerate(js):
            out["states"][j] = {n: per[n][i] for n in per}
    return out


# -- the comparisons -------------------------------------------------------------------------------
def _err(a, b):
    return (a - b).abs().max().item() if b.numel() else 0.0


def _close(a, b, tol_eps, eps, what, before=None, slack=0.0):
    """|a - b| within tol_eps eps of b's largest value (or of ``before``'s, where larger: the
    terms of an update may be larger than its result), plus ``slack``."""
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    scale = max([t.abs().max().item() for t in (b, before) if t is not None and t.numel()], default=0.0)
    tol = tol_eps * eps * scale + slack
    err = _err(a, b)
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def _assert_unchanged(pre, post, where):
    """found_inf: nothing moves, not params, state, step counts, tangents, h nor coefficients."""
    for j, (a, b) in enumerate(zip(pre[0], post[0])):
        assert torch.equal(a, b), f"{where}: found_inf moved param {j}"
    for j, (a, b) in enumerate(zip(pre[1], post[1])):
        assert a.keys() == b.keys() and all(
            a[n] == b[n] if n == "step" else torch.equal(a[n], b[n]) for n in a), f"{where}: found_inf moved state {j}"
    assert pre[2:] == post[2:], f"{where}: found_inf moved the coefficients or hyper-gradients"


def _compare(backend, case, dtype, pre, post, expect, rpost, g64, lrs, where):
    p_eps, s_eps = torch.finfo(dtype).eps, _state_eps(dtype)
    tol = lambda name: tolerance(backend, name)  # noqa: E731
    params, states, coef, h = post
    for j in range(len(params)):
        w = f"{where} param {j}"
        if g64[j] is None:  # no grad: nothing of this param moves
            assert torch.equal(params[j], pre[0][j]), f"{w}: moved without a grad"
            assert states[j].keys() == pre[1][j].keys() and all(
                torch.equal(torch.as_tensor(states[j][n]), torch.as_tensor(pre[1][j][n])) for n in states[j]), \
                f"{w}: state moved without a grad"
            continue
        # One float64 ulp of beta^t in the bias corrections, amplified by beta^t / (1 - beta^t).
        cond = 4 * torch.finfo(torch.float64).eps * max(b ** t / (1 - b ** t) for b in _betas(case, expect)
                                                        for t in [states[j]["step"]])
        _close(params[j], expect["params"][j], tol("param"), p_eps, f"{w} vs oracle", pre[0][j],
               slack=cond * _err(expect["params"][j], pre[0][j]))
        if rpost is not None:
            _close(params[j], rpost[0][j], tol("param"), p_eps, f"{w} vs reference")
            assert states[j].keys() == rpost[1][j].keys(), f"{w}: state {sorted(states[j])} != {sorted(rpost[1][j])}"
        assert states[j]["step"] == pre[1][j].get("step", 0) + 1, f"{w}: step count"
        for n, x in states[j].items():
            if n in ("step", "tangents"):
                continue
            _close(x, expect["states"][j][n], tol("oracle_state"), s_eps + cond, f"{w} state {n} vs oracle",
                   pre[1][j].get(n))
            if rpost is not None:
                _close(x, rpost[1][j][n], tol("state"), s_eps, f"{w} state {n} vs reference")
        if case.learn:
            _check_tangents(backend, case, states[j]["tangents"], expect, rpost, j, lrs[j], s_eps, w)
    if not issubclass(case.cls, MADA):
        return
    if expect["h"] is None:
        assert h == (pre[3] if case.learn else {}), f"{where}: hyper-gradients {h}"
    else:
        _check_hyper(backend, case, coef, h, expect, rpost, s_eps, where)
    for n, v in coef.items():
        if n not in case.learn:
            assert v == pre[2][n], f"{where}: fixed coefficient {n} moved"


def _betas(case, expect) -> tuple[float, float]:
    if issubclass(case.cls, MADA):
        return expect["k_step"]["beta1"], expect["k_step"]["beta2"]
    return case.kwargs.get("betas", (0.9, 0.999))


def _check_tangents(backend, case, rows, expect, rpost, j, lr, s_eps, where):
    exact = expect["tangents"][j]
    assert rows.shape == exact.shape, f"{where}: tangents {tuple(rows.shape)} != {tuple(exact.shape)}"
    k = expect["k_step"]
    for r, n in enumerate(case.learn):
        w = f"{where} tangent row {n}"
        z = exact[r]
        # Scale of the row: its largest value, or the terms that cancel in it (module docstring).
        scale = (z.abs().max().item() if z.numel() else 0.0) + lr / (1 - k.get(n, 0.0) if n in ("beta1", "beta2") else 1)
        err = _err(rows[r], z)
        tol = tolerance(backend, "tangent_f64" if s_eps < 1e-10 else "tangent") * s_eps * scale
        assert err <= tol, f"{w}: error {err:.3g} > {tol:.3g} vs oracle"
        if rpost is None:
            continue
        y = rpost[1][j]["tangents"][r]
        if tolerance(backend, "tangent_vs_ref") is not None:  # a bound of its own against the reference
            yt = y.abs().max().item() if y.numel() else 0.0
            assert _err(rows[r], y) <= tolerance(backend, "tangent_vs_ref") * (yt + case.kwargs["lr"]), \
                f"{w}: vs reference"
        if tolerance(backend, "tangent_vs_ref_err") is not None:  # as close to exact as the reference is
            tol = tolerance(backend, "tangent_vs_ref_err") * _err(y, z) + 4 * s_eps * scale
            assert err <= tol, f"{w}: error {err:.3g} > {tol:.3g} (reference's: {_err(y, z):.3g})"


def _check_hyper(backend, case, coef, h, expect, rpost, s_eps, where):
    assert list(h) == list(case.learn), f"{where}: hyper-gradients of {list(h)}"
    rates = sm.hyper_settings(case.kwargs)["rates"]
    rel = tolerance(backend, "hyper_rel") or tolerance(backend, "hyper") * s_eps
    for n in case.learn:
        bound = expect["bound"][n]
        assert abs(h[n] - expect["h"][n]) <= rel * bound, \
            f"{where}: h[{n}] = {h[n]!r}, exact dot of its own tangents {expect['h'][n]!r} (sum |gT| {bound:.3g})"
        k_tol = rates[n] * rel * bound + 4 * _ulp(expect["coef"][n])
        assert abs(coef[n] - expect["coef"][n]) <= k_tol, f"{where}: coefficient {n} = {coef[n]!r}, " \
            f"oracle {expect['coef'][n]!r}"
        if rpost is not None:
            rh, rk = rpost[3][n], rpost[2][n]
            assert abs(h[n] - rh) <= tolerance(backend, "hyper") * s_eps * bound, \
                f"{where}: h[{n}] = {h[n]!r}, reference {rh!r}"
            assert abs(coef[n] - rk) <= rates[n] * abs(h[n] - rh) + 4 * _ulp(rk), \
                f"{where}: coefficient {n} = {coef[n]!r}, reference {rk!r}"


def _ulp(x: float) -> float:
    return math.ulp(max(abs(x), 1e-300))
