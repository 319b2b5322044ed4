"""Drop-in for torch.optim.AdamW (issue 20): tensor lr, per-group options, maximize,
schedulers that cycle betas, and AdamW's implementation switches.

Equalities are bitwise: a tensor lr against the float of its value, a group's options
against an optimizer built with them, maximize against minimizing -loss. Each backend
present here runs (the Triton kernels under the interpreter, with small tensors).
"""
from __future__ import annotations

import copy

import pytest
import torch

import spec_model as sm
from mada_fused import MADA, AVGrad, AdaMod, DiffMod
from mada_fused import backends as registry
from mada_fused.optimizer import CONFIG_CACHE_SIZE

ALL = [MADA, AVGrad, AdaMod, DiffMod]
PER_GROUP = [AVGrad, AdaMod, DiffMod]  # the optimizers whose groups take betas
SHAPES = [(3, 5), (7,), (1,)]
# Each optimizer's own per-group option besides betas, eps, weight_decay, maximize.
MEMORY = {AdaMod: dict(beta3=0.95), DiffMod: dict(len_memory=20), AVGrad: {}}


def _backends(*names: str) -> list:
    out = []
    for name in names:
        marks = () if name in registry.available() else pytest.mark.skip(reason=f"backend {name!r} not built here")
        out.append(pytest.param(name, marks=marks, id=name))
    return out


FUSED = _backends("reference", "cpu", "cuda_on_cpu", "triton")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """CPU tensors reach the Triton kernels only through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _params(dtype=torch.float32, shapes=SHAPES):
    return [torch.randn(*s, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _grads(params, steps):
    return [[torch.randn(p.shape, dtype=torch.float64).to(p.dtype) for p in params] for _ in range(steps)]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _run(opt, params, grads):
    sm.run_steps(opt, params, grads)
    return [p.detach().clone() for p in params]


def _equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"differ by {(x.double() - y.double()).abs().max().item():.3g}"


# --------------------------------------------------------------------------- #
# 1. Tensor lr
# --------------------------------------------------------------------------- #

LR_FORMS = {
    "ctor-0dim-f32": lambda: torch.tensor(3e-2),
    "ctor-1elem-f64": lambda: torch.tensor([3e-2], dtype=torch.float64),
    "ctor-0dim-bf16": lambda: torch.tensor(3e-2, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("backend", _backends("reference", "cpu"))
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("form", list(LR_FORMS) + ["group-1elem-f32"])
def test_tensor_lr_equals_float_lr(cls, backend, form):
    params = _params()
    grads = _grads(params, 3)
    if form.startswith("ctor"):
        lr = LR_FORMS[form]()
        opt = cls(params, lr=lr, backend=backend)
    else:  # a group with a tensor lr, next to one with the default float lr
        lr = torch.tensor([2e-2])
        opt = cls([dict(params=params[:1]), dict(params=params[1:], lr=lr)], backend=backend)
    twins = _clone(params)
    got = _run(opt, params, grads)
    value = float(lr.reshape(()))  # the tensor's own value: a float32 tensor is not 3e-2 exactly
    if form.startswith("ctor"):
        twin = cls(twins, lr=value, backend=backend)
    else:
        twin = cls([dict(params=twins[:1]), dict(params=twins[1:], lr=value)], backend=backend)
    want = _run(twin, twins, grads)
    _equal(got, want)


@pytest.mark.parametrize("cls", [AdaMod, MADA], ids=lambda c: c.__name__)
def test_tensor_lr_triton(cls):
    if "triton" not in registry.available():
        pytest.skip("triton not installed")
    params = _params(shapes=[(9,), (2, 3)])
    grads = _grads(params, 2)
    twins = _clone(params)
    got = _run(cls(params, lr=torch.tensor(2e-2, dtype=torch.float64), backend="triton"), params, grads)
    _equal(got, _run(cls(twins, lr=2e-2, backend="triton"), twins, grads))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_lr_tensor_of_two_elements_is_a_value_error(cls):
    params = _params()
    with pytest.raises(ValueError, match="1-element"):
        cls(params, lr=torch.tensor([1e-3, 1e-3]), backend="reference")
    opt = cls(params[:1], lr=1e-3, backend="reference")
    with pytest.raises(ValueError, match="1-element"):
        opt.add_param_group(dict(params=params[1:], lr=torch.tensor([1e-3, 1e-3])))
    assert len(opt.param_groups) == 1
    sm.run_steps(opt, params[:1], _grads(params[:1], 1))
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 1e-3])
    sm.set_grads(params[:1], _grads(params[:1], 1)[0])
    snap = sm.snapshot(opt, params[:1])
    with pytest.raises(ValueError, match="1-element"):
        opt.step()
    sm.assert_unchanged(snap, opt, params[:1])


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_tensor_betas_in_the_constructor(cls):
    """As torch.optim: 1-element tensors, read once as floats; more elements are a ValueError."""
    params = _params()
    grads = _grads(params, 2)
    twins = _clone(params)
    b1, b2 = torch.tensor(0.8, dtype=torch.float64), torch.tensor([0.99], dtype=torch.float64)
    got = _run(cls(params, betas=(b1, b2), backend="reference"), params, grads)
    _equal(got, _run(cls(twins, betas=(0.8, 0.99), backend="reference"), twins, grads))
    with pytest.raises(ValueError, match="1 element"):
        cls(params, betas=(torch.tensor([0.8, 0.9]), 0.99), backend="reference")


@pytest.mark.parametrize("bad", [torch.tensor(-1e-3), torch.tensor(float("nan")), torch.tensor(1, dtype=torch.int64)])
def test_bad_tensor_lr_in_constructor(bad):
    with pytest.raises(ValueError):
        AdaMod(_params(), lr=bad, backend="reference")


# --------------------------------------------------------------------------- #
# 2. Per-group options
# --------------------------------------------------------------------------- #

def _options(cls, k: int) -> dict:
    """Group k's options: every one differs from the defaults and between the two groups."""
    if k == 0:
        return dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True, lr=2e-2, **MEMORY[cls])
    return dict(betas=(0.95, 0.9), eps=1e-3, weight_decay=0.0, maximize=False, lr=1e-2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", PER_GROUP, ids=lambda c: c.__name__)
def test_group_options_equal_separate_optimizers(cls, backend):
    params = _params(shapes=[(9,), (2, 3), (5,)])  # one bucket: the groups' configs split it
    grads = _grads(params, 3)
    parts = (params[:2], params[2:])
    opt = cls([dict(params=parts[0], **_options(cls, 0)), dict(params=parts[1], **_options(cls, 1))],
              backend=backend)
    before = _clone(params)
    got = _run(opt, params, grads)
    want = []
    for k, part in enumerate(parts):
        twins = [before[i] for i, p in enumerate(params) if any(p is q for q in part)]
        idx = [i for i, p in enumerate(params) if any(p is q for q in part)]
        want += _run(cls(twins, backend=backend, **_options(cls, k)), twins, [[g[i] for i in idx] for g in grads])
    _equal(got, want)


@pytest.mark.parametrize("backend", _backends("reference", "cpu", "cuda_on_cpu"))
def test_mada_group_eps(backend):
    kw = dict(beta3=0.3, rho=0.5, gamma=0.8, learn=(), backend=backend)
    params = _params(shapes=[(9,), (4,)])
    grads = _grads(params, 3)
    opt = MADA([dict(params=params[:1]), dict(params=params[1:], eps=1e-2)], **kw)
    before = _clone(params)
    got = _run(opt, params, grads)
    want = []
    for i, eps in ((0, 1e-8), (1, 1e-2)):
        twin = before[i:i + 1]
        want += _run(MADA(twin, eps=eps, **kw), twin, [[g[i]] for g in grads])
    _equal(got, want)


@pytest.mark.parametrize("option", [dict(betas=(0.8, 0.9)), dict(rho=0.5), dict(beta3=0.1), dict(maximize=True),
                                    dict(hyper_lr={"c": 0.1}), dict(learn=())])
def test_mada_refuses_global_options_in_groups(option):
    params = _params()
    opt = MADA(params[:1], backend="reference")
    with pytest.raises(ValueError, match="learned jointly"):
        opt.add_param_group(dict(params=params[1:], **option))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", PER_GROUP, ids=lambda c: c.__name__)
@pytest.mark.parametrize("key,value", [("betas", (1.0, 0.9)), ("betas", 0.9), ("eps", -1.0), ("maximize", 1)])
def test_bad_group_option_changes_nothing(cls, key, value):
    params = _params()
    opt = cls(params, backend="reference")
    with pytest.raises((TypeError, ValueError), match=key):
        opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], **{key: value}))
    sm.run_steps(opt, params, _grads(params, 1))
    opt.param_groups[0][key] = value  # as a scheduler or a user could
    sm.set_grads(params, _grads(params, 1)[0])
    snap = sm.snapshot(opt, params)
    with pytest.raises((TypeError, ValueError), match=r"param_groups\[0\]"):
        opt.step()
    sm.assert_unchanged(snap, opt, params)


@pytest.mark.parametrize("cls", PER_GROUP, ids=lambda c: c.__name__)
def test_group_options_resume_from_state_dict(cls):
    params = _params()
    grads = _grads(params, 4)
    opt = cls([dict(params=params[:1], **_options(cls, 0)), dict(params=params[1:])], backend="reference")
    sm.run_steps(opt, params, grads[:2])
    twins = _clone(params)  # the parameters as they are now: the state_dict carries the rest
    twin = cls([dict(params=twins[:1]), dict(params=twins[1:])], backend="reference")  # default options
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert tuple(twin.param_groups[0]["betas"]) == (0.8, 0.99)
    _equal(_run(opt, params, grads[2:]), _run(twin, twins, grads[2:]))
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["betas"] = (0.9, 1.5)
    snap = sm.snapshot(twin, twins)
    with pytest.raises(ValueError, match="betas"):
        twin.load_state_dict(bad)
    sm.assert_unchanged(snap, twin, twins)


def test_config_cache_is_capped():
    params = _params()
    opt = AdaMod(params, backend="reference")
    for k in range(CONFIG_CACHE_SIZE + 10):
        opt.param_groups[0]["betas"] = (0.5 + k / 1000, 0.999)
        sm.run_steps(opt, params, _grads(params, 1))
    assert len(opt._config_cache) == CONFIG_CACHE_SIZE


# --------------------------------------------------------------------------- #
# maximize
# --------------------------------------------------------------------------- #

MAXIMIZE_KW = {MADA: dict(beta3=0.3, rho=0.5, gamma=0.8, hyper_warmup=0), AVGrad: {}, AdaMod: {}, DiffMod: {}}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_maximize_equals_minimizing_the_negated_loss(cls, backend):
    params = _params(shapes=[(9,), (2, 3)])
    grads = _grads(params, 3)
    twins = _clone(params)
    got = _run(cls(params, lr=1e-2, maximize=True, backend=backend, **MAXIMIZE_KW[cls]), params, grads)
    want = _run(cls(twins, lr=1e-2, backend=backend, **MAXIMIZE_KW[cls]), twins,
                [[-g for g in row] for row in grads])
    _equal(got, want)


def test_adamod_maximize_against_the_spec_model():
    """An independent oracle: spec_model's AdaMod stepped with -g (docs/spec.md section 3)."""
    theta = torch.randn(20, dtype=torch.float64)
    p = theta.clone().requires_grad_()
    opt = AdaMod([p], lr=1e-2, beta3=0.9, weight_decay=0.1, maximize=True, backend="reference")
    state = {}
    for g in _grads([p], 3):
        p.grad = g[0].clone()
        opt.step()
        theta, state = sm.adamod_step(theta, -g[0], state, lr=1e-2, beta3=0.9, weight_decay=0.1)
    torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- #
# 3. Schedulers that cycle betas
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("cls", PER_GROUP, ids=lambda c: c.__name__)
def test_one_cycle_lr_cycles_betas(cls):
    params = _params()
    opt = cls(params, backend="reference")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    seen = []
    plain_params = _clone(params)  # before any step
    plain = cls(plain_params, backend="reference")  # the same schedule of lr, betas left alone
    plain_sched = torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=0.05, total_steps=10, cycle_momentum=False)
    for grads in _grads(params, 10):
        seen.append(opt.param_groups[0]["betas"][0])
        sm.run_steps(opt, params, [grads])
        sm.run_steps(plain, plain_params, [grads])
        sched.step()
        plain_sched.step()
    assert len(set(seen)) > 5 and min(seen) < 0.9 < max(seen) + 1e-12
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, plain_params)), "the cycled beta1 had no effect"


def test_one_cycle_lr_with_mada_names_cycle_momentum_false():
    params = _params()
    opt = MADA(params, backend="reference")
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, cycle_momentum=False)
    for grads in _grads(params, 3):
        sm.run_steps(opt, params, [grads])
        sched.step()
    assert opt.coefficients["beta1"] == 0.9  # not moved yet (warm-up), and not by the scheduler


def test_mada_groups_survive_copy_and_state_dict():
    params = _params()
    opt = MADA(params, backend="reference", hyper_warmup=0)
    sm.run_steps(opt, params, _grads(params, 2))
    clone = copy.deepcopy(opt)
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        clone.param_groups[0]["betas"] = (0.5, 0.9)
    twins = _clone(params)
    twin = MADA(twins, betas=(0.8, 0.99), backend="reference", hyper_warmup=0)
    twin.load_state_dict(opt.state_dict())  # another starting point: the learned betas come with the state
    assert twin.coefficients == opt.coefficients


# --------------------------------------------------------------------------- #
# 4. AdamW's switches
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_adamw_switches(cls):
    params = _params()
    with pytest.raises(ValueError, match="AVGrad"):
        cls(params, amsgrad=True)
    with pytest.raises(ValueError, match=r"torch\.optim\.AdamW\(differentiable=True\)"):
        cls(params, differentiable=True)
    with pytest.raises(ValueError, match="reference"):
        cls(params, backend="reference", fused=True)
    with pytest.raises(TypeError, match="foreach"):
        cls(params, foreach="yes")
    for kw in (dict(foreach=True), dict(foreach=False), dict(capturable=True), dict(capturable=False),
               dict(amsgrad=False, differentiable=False, fused=None)):
        cls(params, backend="reference", **kw)
    opt = cls(params, fused=False)
    sm.run_steps(opt, params, _grads(params, 1))
    assert {b.name for b in opt._backend_for.values()} == {"reference"}


def test_fused_switch_wins_over_the_environment(monkeypatch):
    params = _params()
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    with pytest.raises(ValueError, match="fused=True"):
        AdaMod(params, fused=True)
    if "cpu" in registry.available():
        monkeypatch.setenv(registry.ENV_VAR, "cpu")
        opt = AdaMod(params, fused=False)  # an explicit fused=False is the unfused implementation
        sm.run_steps(opt, params, _grads(params, 1))
        assert {b.name for b in opt._backend_for.values()} == {"reference"}


@pytest.mark.parametrize("cls", [AdaMod, MADA], ids=lambda c: c.__name__)
def test_fused_true_demands_a_fused_backend(cls, no_backend_env):
    params = _params()
    if "cpu" not in registry.available():
        with pytest.raises(ValueError, match="fused=True"):
            cls(params, fused=True)
        return
    opt = cls(params, fused=True)
    sm.run_steps(opt, params, _grads(params, 1))
    assert {b.name for b in opt._backend_for.values()} == {"cpu"}
    with pytest.raises(ValueError, match="fused=False"):
        cls(params, backend="cpu", fused=False)


def test_avgrad_new_group_betas_refused_under_capture():
    """Per-group betas are a coefficient tensor made on first use (a host-to-device copy): a
    CUDA graph capture may only replay ones made before it (the logic, forced on the CPU)."""
    params = _params()
    opt = AVGrad([dict(params=params[:1], betas=(0.8, 0.99)), dict(params=params[1:])], backend="reference")
    sm.run_steps(opt, params, _grads(params, 1))
    (scalars,) = [v for v in opt._device_scalars({params[0].device}, None, None)[0].values()]
    seen = opt._configs(opt.param_groups)[0]
    assert opt._work_scalars(scalars, seen, capturing=True).coef.tolist()[:2] == [0.8, 0.99]  # made before
    opt.param_groups[0]["betas"] = (0.7, 0.99)
    new = opt._configs(opt.param_groups)[0]
    cached = list(opt._group_coef)
    with pytest.raises(RuntimeError, match="capture"):
        opt._work_scalars(scalars, new, capturing=True)
    assert list(opt._group_coef) == cached
