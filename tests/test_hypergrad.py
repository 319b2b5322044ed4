"""docs/spec.md section 2: hyper-gradients, tangents and the hyper-update, against autograd through
the independent float64 model (spec_model), on fresh random data."""
from __future__ import annotations

import math

import pytest
import torch

import spec_model as sm
from mada_fused import MADA

LRS, WDS = (4e-3, 1.2e-2), (0.05, 0.0)


def interior_coeffs():
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(()).item()
    return dict(beta1=u(0.6, 0.95), beta2=u(0.9, 0.99), beta3=u(0.1, 0.8), rho=u(0.2, 0.8),
                c=u(0.2, 0.8), gamma=u(0.2, 0.8))


def setup(make_params, make_grads, steps, coeffs=None, shapes=None, **opt_kw):
    """Params in two groups with different lr / wd, a MADA over them, the matching model."""
    params = make_params(shapes) if shapes else make_params()
    grads = make_grads(params, steps)
    coeffs = coeffs or interior_coeffs()
    h = len(params) // 2
    groups = [dict(params=params[:h], lr=LRS[0], weight_decay=WDS[0]),
              dict(params=params[h:], lr=LRS[1], weight_decay=WDS[1])]
    lrs = [LRS[0]] * h + [LRS[1]] * (len(params) - h)
    wds = [WDS[0]] * h + [WDS[1]] * (len(params) - h)
    opt = MADA(groups, **sm.mada_kwargs(coeffs), backend="reference", **opt_kw)
    model = sm.MadaSim(params, lrs, wds, eps=opt_kw.get("eps", 1e-8), mod_beta=opt_kw.get("mod_beta", 0.0),
                       lion_betas=opt_kw.get("lion_betas", (0.95, 0.98)), vbar=opt_kw.get("vbar", "full"),
                       maximize=opt_kw.get("maximize", False))
    return params, grads, coeffs, opt, model, lrs


def h_tolerance(model, next_grads, lrs, coeffs):
    """Rounding-level tolerance per coefficient: relative to sum |g_next du/dk|, with a floor at
    the size of the individual terms that cancel (~ lr |g| / (1 - beta)) for analytic zeros."""
    terms = model.hyper_terms_abs(next_grads)
    floor = sum(lr * g.abs().sum().item() for lr, g in zip(lrs, next_grads))
    floor /= min(1 - coeffs["beta1"], 1 - coeffs["beta2"])
    return 1e-9 * terms + 1e-13 * floor


def assert_h(opt_h, ref_h, tol, names):
    assert set(opt_h) == set(names), f"hypergradients keys {sorted(opt_h)} != learn {sorted(names)}"
    for n in names:
        j = sm.CANON.index(n)
        got, exp = float(opt_h[n]), ref_h[j].item()
        assert abs(got - exp) <= tol[j].item(), f"h[{n}]: got {got!r}, autograd {exp!r} (tol {tol[j].item():.3g})"


# --------------------------------------------------------------------------- #
# h and tangents with k held fixed (huge warmup)
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("order", ["lagged", "exact"])
@pytest.mark.parametrize("mod_beta", [0.0, 0.9])
@pytest.mark.parametrize("vbar", ["full", "detach"])
def test_hypergradients_and_tangents_match_autograd(make_params, make_grads, vbar, mod_beta, order):
    steps = 6
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, steps, vbar=vbar, mod_beta=mod_beta,
                                                    hyper_order=order, hyper_warmup=10 ** 6)
    k = sm.kvec(coeffs, requires_grad=True)
    clip_counts = []
    for s, gs in enumerate(grads, start=1):
        sm.set_grads(params, gs)
        opt.step()
        if s == 1:
            assert opt.hypergradients == {}, "hypergradients must be {} until the second step"
        else:
            # h for step (s-1)'s tangents, with g_s as g_next
            ref_h = model.hypergrad(gs, k)
            assert_h(opt.hypergradients, ref_h.detach(), h_tolerance(model, gs, lrs, coeffs), sm.CANON)
        model.step(gs, k)
        if mod_beta:
            clipped = sum(int((a["eta"] > a["s"]).sum()) for a in model.last["aux"])
            total = sum(a["eta"].numel() for a in model.last["aux"])
            clip_counts.append((clipped, total))
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), model.thetas[i], rtol=1e-12, atol=1e-14)
            tang = opt.state[p]["tangents"]
            assert tang.shape == (6, *p.shape) and tang.dtype == torch.float64
            ref_t = model.tangents(i)
            scale = lrs[i] / min(1 - coeffs["beta1"], 1 - coeffs["beta2"])
            torch.testing.assert_close(tang, ref_t, rtol=1e-9, atol=1e-13 * scale,
                                       msg=lambda m: f"tangents of param {i} after step {s}: {m}")
        assert opt.coefficients == coeffs, "k moved during warmup"
    if mod_beta:
        # the AdaMod clip must be active for some elements and inactive for others at steps >= 2
        assert any(0 < c < t for c, t in clip_counts[1:]), f"clip never mixed: {clip_counts}"


def test_maximize_hypergradient_uses_negated_next_grad(make_params, make_grads):
    """With maximize=True all of docs/spec.md section 1 runs on g := -grad, including g_next in h."""
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 4, maximize=True, hyper_warmup=10 ** 6)
    k = sm.kvec(coeffs, requires_grad=True)
    for s, gs in enumerate(grads, start=1):
        sm.set_grads(params, gs)
        opt.step()
        if s > 1:
            ref_h = model.hypergrad(gs, k)  # model negates g_next under maximize
            assert_h(opt.hypergradients, ref_h.detach(), h_tolerance(model, gs, lrs, coeffs), sm.CANON)
        model.step(gs, k)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), model.thetas[i], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("learn", [("gamma", "rho", "beta1"), ("c",), ("beta2", "beta3")])
def test_learn_subset_tangent_rows_in_canonical_order(make_params, make_grads, learn):
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 4, learn=learn, hyper_warmup=10 ** 6)
    names = [n for n in sm.CANON if n in learn]
    k = sm.kvec(coeffs, requires_grad=True)
    for s, gs in enumerate(grads, start=1):
        sm.set_grads(params, gs)
        opt.step()
        if s > 1:
            ref_h = model.hypergrad(gs, k)
            assert_h(opt.hypergradients, ref_h.detach(), h_tolerance(model, gs, lrs, coeffs), names)
        model.step(gs, k)
        for i, p in enumerate(params):
            tang = opt.state[p]["tangents"]
            assert tang.shape == (len(names), *p.shape)
            scale = lrs[i] / min(1 - coeffs["beta1"], 1 - coeffs["beta2"])
            torch.testing.assert_close(tang, model.tangents(i, names), rtol=1e-9, atol=1e-13 * scale)


# --------------------------------------------------------------------------- #
# The hyper-update: clip, SGD step, box, warmup, order
# --------------------------------------------------------------------------- #

def expected_update(k_before, h, hyper_lr, clip, bounds, learn):
    out = dict(k_before)
    for n in learn:
        hc = min(max(float(h[n]), -clip), clip)
        out[n] = sm.project(n, k_before[n] - hyper_lr[n] * hc, bounds)
    return out


@pytest.mark.parametrize("order", ["lagged", "exact"])
def test_warmup0_update_rule_and_order(make_params, make_grads, order):
    learn = ("beta1", "beta3", "c", "gamma")
    hyper_lr = dict(beta1=1e-3, beta2=2e-3, beta3=3e-2, rho=5e-2, c=2e-2, gamma=4e-2)
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 7, learn=learn, hyper_lr=hyper_lr,
                                                    hyper_warmup=0, hyper_order=order)
    moved = set()
    k_prev_used = None
    for s, gs in enumerate(grads, start=1):
        k_before = dict(opt.coefficients)
        sm.set_grads(params, gs)
        opt.step()
        k_after = dict(opt.coefficients)
        if s == 1:
            assert opt.hypergradients == {} and k_after == k_before, "no h (and no update) at the first step"
        else:
            exp = expected_update(k_before, opt.hypergradients, hyper_lr, 10.0, sm.DEFAULT_BOUNDS, learn)
            for n in sm.CANON:
                assert k_after[n] == pytest.approx(exp[n], rel=1e-14, abs=1e-16), \
                    f"step {s}: {n} = {k_after[n]!r}, expected {exp[n]!r} from h = {opt.hypergradients.get(n)}"
            moved |= {n for n in sm.CANON if k_after[n] != k_before[n]}
        # which k did step s use?  lagged: the one before the call; exact: the updated one
        k_used = k_before if order == "lagged" else k_after
        k_vec = sm.kvec(k_used, requires_grad=True)
        if s > 1:  # h itself: autograd through step s-1 at the k that step used
            ref_h = model.hypergrad(gs, model_k)
            assert_h(opt.hypergradients, ref_h.detach(), h_tolerance(model, gs, lrs, k_prev_used), learn)
        model.step(gs, k_vec)
        model_k, k_prev_used = k_vec, k_used
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), model.thetas[i], rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"{order}: step {s} did not use the expected k: {m}")
    assert moved == set(learn), f"moved {sorted(moved)}, learned {sorted(learn)}"


def test_hyper_clip_bites(make_params, make_grads):
    clip = 1e-6
    hyper_lr = {n: 1e-2 for n in sm.CANON}
    # warmup 2: the first update (call 3) uses step 2's tangents; at t = 1 some du/dk vanish
    # analytically (Adam's first step does not depend on beta1, ...), so h would be rounding noise
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 5, hyper_lr=hyper_lr, hyper_clip=clip,
                                                    hyper_warmup=2)
    for s, gs in enumerate(grads, start=1):
        k_before = dict(opt.coefficients)
        sm.set_grads(params, gs)
        opt.step()
        if s <= 2:
            assert opt.coefficients == k_before
            continue
        h = opt.hypergradients
        for n in sm.CANON:
            assert abs(h[n]) > clip, f"test data too tame: |h[{n}]| = {abs(h[n])}"
            # hypergradients reports h BEFORE clipping; the move is exactly hyper_lr * clip
            exp = k_before[n] - math.copysign(hyper_lr[n] * clip, h[n])
            assert opt.coefficients[n] == pytest.approx(exp, rel=1e-14), f"{n}: {opt.coefficients[n]!r} vs {exp!r}"


PAPER = sm.PAPER_BOUNDS
CUSTOM = dict(beta1=(0.5, 0.97), rho=(0.15, 0.85), gamma=(0.1, 0.9), c=(0.05, 0.95), beta3=(0.02, 0.9))


@pytest.mark.parametrize("bounds", [None, "paper", CUSTOM], ids=["default", "paper", "custom"])
def test_projection_onto_box(make_params, make_grads, bounds):
    hyper_lr = {n: 1e6 for n in sm.CANON}  # any step leaves the box: the result is an end point
    # first update at call 3, from step 2's tangents (all du/dk are non-zero from t = 2 on)
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 3, hyper_lr=hyper_lr, hyper_warmup=2,
                                                    bounds=bounds)
    box = dict(sm.DEFAULT_BOUNDS)
    if bounds == "paper":
        box = dict(PAPER)
    elif isinstance(bounds, dict):
        box.update(bounds)
    sm.run_steps(opt, params, grads)
    h = opt.hypergradients
    for n in sm.CANON:
        assert abs(h[n]) * 1e6 > 1.0, f"test data too tame for {n}: h = {h[n]}"
        lo, hi = box[n]
        exp = lo if h[n] > 0 else hi
        assert opt.coefficients[n] == exp, f"{n}: {opt.coefficients[n]!r} not projected to {exp!r} (h = {h[n]})"


def test_default_hyper_settings(make_params, make_grads):
    """hyper_lr=None -> docs/spec.md section 2.3 defaults (beta1, beta2 5e-4; others 1e-1), clip 10, warmup 50."""
    params = make_params([(3,), (2, 2)])
    coeffs = dict(beta1=0.9, beta2=0.99, beta3=0.5, rho=0.5, c=0.5, gamma=0.5)
    opt = MADA(params, lr=1e-2, betas=(0.9, 0.99), beta3=0.5, rho=0.5, c=0.5, gamma=0.5, backend="reference")
    grads = make_grads(params, 51)
    for s, gs in enumerate(grads, start=1):
        k_before = dict(opt.coefficients)
        sm.set_grads(params, gs)
        opt.step()
        if s <= 50:
            assert opt.coefficients == coeffs, f"coefficients moved at step {s} <= warmup 50"
            assert (opt.hypergradients == {}) == (s == 1), "h is computed during warmup too"
    exp = expected_update(k_before, opt.hypergradients, sm.DEFAULT_HYPER_LR, 10.0, sm.DEFAULT_BOUNDS, sm.CANON)
    for n in sm.CANON:
        assert opt.coefficients[n] == pytest.approx(exp[n], rel=1e-14, abs=1e-16), n
    assert opt.coefficients != coeffs


@pytest.mark.parametrize("warmup", [1, 3])
def test_warmup_boundary(make_params, make_grads, warmup):
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, warmup + 2, hyper_warmup=warmup,
                                                    hyper_lr={n: 1e-3 for n in sm.CANON})
    for s, gs in enumerate(grads, start=1):
        sm.set_grads(params, gs)
        opt.step()
        moved = opt.coefficients != coeffs
        assert moved == (s > warmup), f"step {s}, warmup {warmup}: moved={moved}"


# --------------------------------------------------------------------------- #
# lagged vs exact; full simulation of learning
# --------------------------------------------------------------------------- #

def test_orders_identical_when_hyper_lr_zero(make_params, make_grads):
    zero = {n: 0.0 for n in sm.CANON}
    params = make_params()
    grads = make_grads(params, 8)
    coeffs = interior_coeffs()
    runs = {}
    for order in ("lagged", "exact"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = MADA(ps, lr=1e-2, **sm.mada_kwargs(coeffs), hyper_lr=zero, hyper_warmup=0, hyper_order=order,
                   backend="reference")
        sm.run_steps(opt, ps, grads)
        runs[order] = (ps, dict(opt.coefficients), dict(opt.hypergradients))
    (pl, kl, hl), (pe, ke, he) = runs["lagged"], runs["exact"]
    assert kl == ke == coeffs
    for a, b in zip(pl, pe):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert hl.keys() == he.keys() == set(sm.CANON)
    for n in sm.CANON:
        assert hl[n] == pytest.approx(he[n], rel=1e-12, abs=1e-300)


def test_orders_stay_close(make_params, make_grads):
    params = make_params()
    grads = make_grads(params, 10)
    coeffs = interior_coeffs()
    hyper_lr = {n: 1e-3 for n in sm.CANON}
    runs = {}
    for order in ("lagged", "exact"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = MADA(ps, lr=1e-2, **sm.mada_kwargs(coeffs), hyper_lr=hyper_lr, hyper_warmup=0, hyper_order=order,
                   backend="reference")
        sm.run_steps(opt, ps, grads)
        runs[order] = (ps, dict(opt.coefficients))
    (pl, kl), (pe, ke) = runs["lagged"], runs["exact"]
    assert kl != coeffs and ke != coeffs
    assert kl != ke  # they are different algorithms...
    for n in sm.CANON:  # ...that stay close: each k moved at most 10 * 1e-3 * 10 in total
        assert abs(kl[n] - ke[n]) <= 0.1 and abs(kl[n] - ke[n]) <= 0.5 * abs(kl[n] - coeffs[n]) + 1e-3
    for a, b, p0 in zip(pl, pe, params):
        travel = (a.detach() - p0.detach()).abs().max().item()
        assert (a - b).abs().max().item() <= 0.1 * travel


@pytest.mark.parametrize("order", ["lagged", "exact"])
@pytest.mark.parametrize("mod_beta,vbar", [(0.0, "full"), (0.7, "detach")])
def test_full_learning_simulation(make_params, make_grads, order, mod_beta, vbar):
    """Independent simulation of docs/spec.md section 2's whole loop (h by autograd, clip, SGD, box, warmup,
    order) against the optimizer, params and coefficients after every step."""
    learn = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
    # |h| is ~1e-4 .. 1e-1 on this data: clip 0.02 bites for some coefficients, not for others
    hyper_lr = dict(beta1=5e-2, beta2=2e-2, beta3=1.0, rho=1.0, c=1.0, gamma=1.0)
    clip, warmup = 0.02, 2
    params, grads, coeffs, opt, model, lrs = setup(make_params, make_grads, 9, hyper_lr=hyper_lr, hyper_clip=clip,
                                                    hyper_warmup=warmup, hyper_order=order, mod_beta=mod_beta,
                                                    vbar=vbar)
    k = dict(coeffs)
    k_vec = None
    clipped_any = unclipped_any = False
    for s, gs in enumerate(grads, start=1):
        if s > 1:
            h = model.hypergrad(gs, k_vec).detach()
            hd = {n: h[sm.CANON.index(n)].item() for n in learn}
            if s > warmup:
                clipped_any |= any(abs(v) > clip for v in hd.values())
                unclipped_any |= any(abs(v) < clip for v in hd.values())
            k_new = expected_update(k, hd, hyper_lr, clip, sm.DEFAULT_BOUNDS, learn) if s > warmup else dict(k)
        else:
            k_new = dict(k)
        k_used = k if order == "lagged" else k_new
        k_vec = sm.kvec(k_used, requires_grad=True)
        sm.set_grads(params, gs)
        opt.step()
        model.step(gs, k_vec)
        k = k_new
        for n in sm.CANON:
            assert opt.coefficients[n] == pytest.approx(k[n], rel=1e-9, abs=1e-12), f"step {s}: {n}"
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), model.thetas[i], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"step {s} param {i}: {m}")
    assert k != coeffs
    assert clipped_any and unclipped_any, "hyper_clip should bite for some h and not for others: weak test data"
