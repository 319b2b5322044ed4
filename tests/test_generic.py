"""What torch's generic optimizer tests (OptimizerInfo, test/test_optim.py) check of every
torch.optim optimizer, for MADA, AdaMod, AVGrad and DiffMod on the reference, cpu and
cuda_on_cpu backends. Numbers are checked against tests/spec_model.py (docs/spec.md written
independently) or against explicit values; the protocol tests against an uninterrupted run."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod, backends

BETAS = (0.9, 0.99)
# One configuration per class with every state of its class in use. MADA's is fixed (nothing
# learned) so that spec_model's one-step function is its oracle; "MADA-learn" joins the tests
# that check the optimizer protocol against itself.
CASES = {
    "MADA": (MADA, dict(betas=BETAS, beta3=0.2, rho=0.5, c=0.9, gamma=0.9, mod_beta=0.9, learn=())),
    "AdaMod": (AdaMod, dict(betas=BETAS, beta3=0.9)),
    "AVGrad": (AVGrad, dict(betas=BETAS)),
    "DiffMod": (DiffMod, dict(betas=BETAS, len_memory=10)),
}
LEARN = dict(betas=BETAS, beta3=0.2, rho=0.5, c=0.9, gamma=0.9, mod_beta=0.9, hyper_warmup=1,
             hyper_lr={n: 1e-2 for n in sm.CANON})
PROTOCOL = {**CASES, "MADA-learn": (MADA, LEARN)}
BACKENDS = ["reference", "cpu", "cuda_on_cpu"]
STATE = {"MADA": {"m", "v", "n", "g_prev", "l", "vb", "s"}, "AdaMod": {"m", "v", "s"},
         "AVGrad": {"m", "v", "vb"}, "DiffMod": {"m", "v", "s", "g_prev"},
         "MADA-learn": {"m", "v", "n", "g_prev", "l", "vb", "s", "tangents"}}


@pytest.fixture(params=BACKENDS)
def backend(request):
    try:
        backends.resolve(request.param, torch.device("cpu"), torch.float64)
    except ValueError as e:  # BackendUnavailable: not built here
        pytest.skip(str(e))
    return request.param


def build(name, params, backend, **kw):
    cls, cfg = PROTOCOL[name]
    return cls(params, backend=backend, **{**cfg, **kw})


class Model:
    """spec_model's float64 one-step functions over a list of tensors, each with its group's lr/wd."""

    def __init__(self, name, params):
        self.name = name
        self.theta = [p.detach().to(torch.float64).clone() for p in params]
        self.state = [sm.mada_init_state(t) if name == "MADA" else {} for t in self.theta]

    def step(self, grads, lrs, wds):
        cfg = CASES[self.name][1]
        for i, g in enumerate(grads):
            if g is None:
                continue
            th, st, lr, wd, g = self.theta[i], self.state[i], lrs[i], wds[i], g.to(torch.float64)
            if self.name == "MADA":
                values = (*BETAS, *(cfg[n] for n in sm.CANON[2:]))
                k = {n: torch.tensor(float(v), dtype=torch.float64) for n, v in zip(sm.CANON, values)}
                th, st = sm.mada_step(th, g, st, k, lr=lr, weight_decay=wd, mod_beta=cfg["mod_beta"])[:2]
            elif self.name == "AdaMod":
                th, st = sm.adamod_step(th, g, st, lr=lr, betas=BETAS, beta3=0.9, weight_decay=wd)
            elif self.name == "AVGrad":
                th, st = sm.avgrad_step(th, g, st, lr=lr, betas=BETAS, weight_decay=wd)
            else:
                th, st = sm.diffmod_step(th, g, st, lr=lr, betas=BETAS, len_memory=10, weight_decay=wd)
            self.theta[i], self.state[i] = th, st

    def check(self, params, rtol=1e-10, atol=1e-12):
        for i, (p, t) in enumerate(zip(params, self.theta)):
            torch.testing.assert_close(p.detach().to(torch.float64), t, rtol=rtol, atol=atol, msg=f"param {i}")


def group_values(opt):
    """Per parameter: its group's (lr, weight_decay) now."""
    pairs = [(float(g["lr"]), g["weight_decay"]) for g in opt.param_groups for _ in g["params"]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def clones(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def random_grads(params, steps):
    return [[torch.randn(p.shape, dtype=torch.float64).to(p.dtype) for p in params] for _ in range(steps)]


# --------------------------------------------------------------------------- #
# Loss goes down on a least-squares problem, with and without LR schedulers
# --------------------------------------------------------------------------- #

SCHEDULERS = {
    None: None,
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.7),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=80),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.98 ** e),
    # the loss must fall 5 % a step, or the LR comes down
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, threshold=0.05,
                                                                              factor=0.8),
}
STEPS = 40
LR = (0.2, 0.3)


class LeastSquares:
    def __init__(self, contiguous):
        self.x = torch.randn(16, 5, dtype=torch.float64)
        w_true = torch.randn(3, 5, dtype=torch.float64)
        self.y = self.x @ w_true.t() + 0.5
        w0 = 0.1 * torch.randn(5, 3, dtype=torch.float64)
        self.w = (w0.t() if not contiguous else w0.t().contiguous()).requires_grad_()
        self.b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        assert self.w.is_contiguous() == contiguous

    def loss(self):
        return ((self.x @ self.w.t() + self.b - self.y) ** 2).mean()


# A scheduler only rewrites the groups' lr, which every backend reads the same way: the slow
# cuda_on_cpu backend (host threads per block) runs without one.
@pytest.mark.parametrize("backend,sched",
                         [(b, s) for b in BACKENDS for s in SCHEDULERS if b != "cuda_on_cpu" or s is None],
                         indirect=["backend"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_decreases_as_the_spec_says(name, backend, sched):
    prob = LeastSquares(contiguous=True)
    _loss_run(name, backend, sched, prob)


@pytest.mark.parametrize("name", list(CASES))
def test_non_contiguous_param_steps_in_place(name, backend):
    prob = LeastSquares(contiguous=False)
    w = prob.w
    _loss_run(name, backend, None, prob)
    assert prob.w is w and not w.is_contiguous()


def _loss_run(name, backend, sched, prob):
    params = [prob.w, prob.b]
    opt = build(name, [dict(params=[prob.w], lr=LR[0], weight_decay=0.01), dict(params=[prob.b], lr=LR[1])], backend)
    model = Model(name, params)
    scheduler = SCHEDULERS[sched](opt) if sched else None
    start = prob.loss().item()

    def closure():
        opt.zero_grad()
        loss = prob.loss()
        loss.backward()
        return loss

    for _ in range(STEPS):
        lrs, wds = group_values(opt)
        expected = prob.loss().item()
        loss = opt.step(closure)
        assert loss.item() == expected  # step returns the closure's loss, taken before the update
        model.step([p.grad for p in params], lrs, wds)
        if sched == "ReduceLROnPlateau":
            scheduler.step(loss.item())
        elif scheduler is not None:
            scheduler.step()
    model.check(params)
    assert prob.loss().item() < 0.25 * start
    if sched is not None:  # the schedule did change the LR the steps used (and the model followed)
        assert all(g["lr"] < 0.9 * lr for g, lr in zip(opt.param_groups, LR))


# --------------------------------------------------------------------------- #
# Parameter groups, dtypes
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(CASES))
def test_zero_grad_step_is_weight_decay_alone(name, backend):
    """A first step on zero gradients moves nothing but the decay: p * (1 - lr * wd) per group."""
    params = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    opt = build(name, [dict(params=params[:1], lr=0.1, weight_decay=0.5),
                       dict(params=params[1:2], lr=0.01, weight_decay=2.0), dict(params=params[2:], lr=0.3)], backend)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b, factor in zip(params, before, (1 - 0.1 * 0.5, 1 - 0.01 * 2.0, 1.0)):
        assert torch.equal(p.detach(), b * factor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_per_group_settings_and_dtypes(name, backend, dtype):
    params = [torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_() for s in [(4, 3), (5,), (2, 2, 2)]]
    opt = build(name, [dict(params=params[:1], lr=2e-2, weight_decay=0.1),
                       dict(params=params[1:], lr=5e-3, weight_decay=0.0)], backend)
    model = Model(name, params)
    for gs in random_grads(params, 6):
        sm.set_grads(params, gs)
        lrs, wds = group_values(opt)
        opt.step()
        model.step(gs, lrs, wds)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    model.check(params, **tol)
    for p in params:
        assert p.dtype == dtype
        assert all(t.dtype == dtype for k, t in opt.state[p].items() if k != "step")


# --------------------------------------------------------------------------- #
# state_dict: round trips, torch.save(weights_only), hooks, number steps; deepcopy
# --------------------------------------------------------------------------- #

def _stepped(name, backend, steps=3):
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (5,), (2, 3)]]
    opt = build(name, [dict(params=params[:2], lr=1e-2, weight_decay=0.1), dict(params=params[2:], lr=3e-3)], backend)
    grads = random_grads(params, steps + 3)
    sm.run_steps(opt, params, grads[:steps])
    return opt, params, grads[steps:]


def _through(sd, how):
    if how == "deepcopy":
        return copy.deepcopy(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    out = torch.load(buf, weights_only=True)
    if how == "number-steps":  # torch's format before 1.12: state[p]["step"] a Python number
        for st in out["state"].values():
            st["step"] = int(st["step"])
    return out


@pytest.mark.parametrize("how", ["deepcopy", "weights_only", "number-steps"])
@pytest.mark.parametrize("name", list(PROTOCOL))
def test_state_dict_round_trip_is_bit_exact(name, backend, how):
    a, pa, grads = _stepped(name, backend)
    pb = clones(pa)
    b = build(name, [dict(params=pb[:2], lr=1e-2, weight_decay=0.1), dict(params=pb[2:], lr=3e-3)], backend)
    b.load_state_dict(_through(a.state_dict(), how))
    sm.deep_equal(a.state_dict(), b.state_dict(), "state_dict after load")
    for p in pa:
        assert set(a.state[p]) == {"step"} | STATE[name]
    sm.run_steps(a, pa, grads)
    sm.run_steps(b, pb, grads)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    sm.deep_equal(a.state_dict(), b.state_dict(), "state_dict after steps")
    assert [int(a.state[p]["step"]) for p in pa] == [6, 6, 6]


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_deepcopy_is_independent_and_continues_identically(name, backend):
    opt, params, grads = _stepped(name, backend)
    params2, opt2 = copy.deepcopy((params, opt))
    assert opt2.param_groups[0]["params"][0] is params2[0]
    sm.run_steps(opt2, params2, grads)
    saved = opt2.state_dict()
    sm.run_steps(opt, params, grads)  # the original was not moved by the copy's steps
    for x, y in zip(params, params2):
        assert torch.equal(x, y)
    sm.deep_equal(opt.state_dict(), saved, "state_dict")


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_state_dict_hooks(name, backend):
    opt, params, grads = _stepped(name, backend)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd-pre", o is opt)))

    def sd_post(o, sd):
        calls.append(("sd-post", o is opt))
        sd["param_groups"][0]["note"] = "seen"  # changed in place (it returns None): what state_dict returns
        return None

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["note"] == "seen" and "mada" in sd
    assert calls == [("sd-pre", True), ("sd-post", True)]

    other, pb, _ = _stepped(name, backend, steps=0)
    with torch.no_grad():
        for a, b in zip(pb, params):
            a.copy_(b)

    def load_pre(o, state_dict):
        calls.append(("load-pre", o is other))
        state_dict = copy.deepcopy(state_dict)
        del state_dict["param_groups"][0]["note"]  # this optimizer would refuse a group key it does not know
        state_dict["param_groups"][1]["lr"] = 7e-3
        return state_dict

    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o is other, o.param_groups[1]["lr"])))
    other.load_state_dict(sd)
    assert calls[2:] == [("load-pre", True), ("load-post", True, 7e-3)]
    assert other.param_groups[1]["lr"] == 7e-3 and "note" not in other.param_groups[0]
    sm.deep_equal(sd["state"], other.state_dict()["state"], "state")
    sm.run_steps(opt, params, grads)
    sm.run_steps(other, pb, grads[:1])
    assert not torch.equal(params[2], pb[2])  # group 1 stepped with its new lr ...
    sm.run_steps(other, pb, grads[1:])
    if name != "MADA-learn":  # (its coefficients, shared by the groups, learn from both)
        assert torch.equal(params[0], pb[0])  # ... group 0 as before


@pytest.mark.parametrize("name", ["MADA-learn", "AdaMod"])
def test_state_dict_post_hook_sees_the_whole_state_dict(name):
    """A post hook (e.g. one that moves or casts every tensor for saving) sees what state_dict returns."""
    opt, _, _ = _stepped(name, "reference")
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    opt.state_dict()
    assert seen == [["mada", "param_groups", "state"]]


@pytest.mark.parametrize("name", list(CASES))
def test_step_hooks_see_before_and_after(name, backend):
    opt, params, grads = _stepped(name, backend, steps=1)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", params[0].detach().clone())))
    post = opt.register_step_post_hook(lambda o, a, k: seen.append(("post", params[0].detach().clone())))
    # the global hooks every optimizer runs
    gpre = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global-pre", o is opt)))
    gpost = register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global-post", o is opt)))
    before = params[0].detach().clone()
    sm.set_grads(params, grads[0])
    try:
        opt.step()
    finally:
        gpre.remove()
        gpost.remove()
    assert [s[0] for s in seen] == ["global-pre", "pre", "post", "global-post"]
    assert torch.equal(seen[1][1], before) and torch.equal(seen[2][1], params[0].detach())
    assert seen[0][1] is True and seen[3][1] is True
    assert not torch.equal(before, params[0].detach())
    pre.remove()
    post.remove()
    sm.set_grads(params, grads[1])
    opt.step()
    assert len(seen) == 4


# --------------------------------------------------------------------------- #
# zero_grad, parameters without grads, zero-size parameters, empty list, bad input
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(CASES))
def test_zero_grad_both_ways(name, backend):
    opt, params, grads = _stepped(name, backend, steps=2)
    snap = sm.snapshot(opt, params)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    opt.step()  # nothing has a grad: nothing changes, no step counts
    sm.assert_unchanged(snap, opt, params)
    sm.set_grads(params, grads[0])
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    m_before = [opt.state[p]["m"].clone() for p in params]
    opt.step()  # a zero gradient is a gradient: the first moment decays, the step counts
    for p, m in zip(params, m_before):
        assert torch.equal(opt.state[p]["m"], BETAS[0] * m) and int(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_and_gradless_params_are_untouched(name, backend):
    live = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (5,)]]
    frozen = torch.randn(4, 2, dtype=torch.float64)  # requires_grad=False
    gradless = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = build(name, [dict(params=[live[0], frozen], lr=1e-2), dict(params=[gradless, live[1]], lr=3e-2)], backend)
    model = Model(name, live)
    f0, g0 = frozen.clone(), gradless.detach().clone()
    for gs in random_grads(live, 4):
        sm.set_grads(live, gs)
        opt.step()
        model.step(gs, [1e-2, 3e-2], [0.0, 0.0])
    model.check(live)
    assert torch.equal(frozen, f0) and torch.equal(gradless.detach(), g0)
    assert frozen not in opt.state and gradless not in opt.state
    assert set(opt.state_dict()["state"]) == {0, 3}


@pytest.mark.parametrize("name", list(CASES))
def test_zero_size_params(name, backend):
    params = [torch.randn(0, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(0, dtype=torch.float64, requires_grad=True)]
    opt = build(name, params, backend, lr=1e-2)
    model = Model(name, params[1:2])
    for gs in random_grads(params, 3):
        sm.set_grads(params, gs)
        opt.step()
        model.step(gs[1:2], [1e-2], [0.0])
    model.check(params[1:2])
    assert params[0].shape == (0, 3) and params[2].shape == (0,)
    for p in params:
        assert int(opt.state[p]["step"]) == 3
        assert all(t.shape == p.shape for k, t in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("name", list(CASES))
def test_empty_parameter_list(name):
    cls, cfg = CASES[name]
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([], **cfg)
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.AdamW([])  # the behaviour matched


BAD = {
    "lr": dict(lr=-1e-3),
    "eps": dict(eps=-1e-8),
    "weight_decay": dict(weight_decay=-0.1),
    "beta1=1": dict(betas=(1.0, 0.99)),
    "beta1<0": dict(betas=(-0.1, 0.99)),
    "beta2=1": dict(betas=(0.9, 1.0)),
    "beta2>1": dict(betas=(0.9, 1.5)),
    "lr-nan": dict(lr=float("nan")),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", list(CASES))
def test_invalid_arguments_raise_value_error(name, bad):
    cls, cfg = CASES[name]
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError):
        cls([p], **{**cfg, **BAD[bad]})
    if bad in ("lr", "weight_decay"):  # the per-group ones: refused in a group too, and not added
        opt = cls([p], **cfg)
        with pytest.raises(ValueError):
            opt.add_param_group(dict(params=[torch.randn(2, requires_grad=True)], **BAD[bad]))
        assert len(opt.param_groups) == 1
