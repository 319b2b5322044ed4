"""Probes of wrong or unusual use, run by tests/test_robustness.py in a child process.

``python tests/robustness_probes.py BACKEND NAME...`` runs the named probes
on one backend and prints ``START name`` before and ``PASS name`` or
``FAIL name: reason`` after each. Whatever a probe does, the process must
live through it: a crash or a hang shows as a probe that started and never
ended. Every probe checks the rule of docs/robustness.md: a call that raises
leaves parameters, state, step counters and coefficients exactly as they were.
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

from mada_fused import MADA, AVGrad, AdaMod, DiffMod
from mada_fused import flat_state
from mada_fused import optimizer as optimizer_module
from mada_fused.flat_state import INDEX_CACHE_SIZE

ERRORS = (ValueError, TypeError, RuntimeError)
LEARN_ALL = dict(beta3=0.3, rho=0.6, c=0.7, gamma=0.8, mod_beta=0.5, hyper_warmup=0,
                 hyper_lr={n: 1e-2 for n in ("beta1", "beta2", "beta3", "rho", "c", "gamma")})
# One of each optimizer, MADA learning every coefficient (the most state there is).
KINDS: dict[str, Callable] = {
    "adamod": lambda ps, be, **kw: AdaMod(ps, lr=1e-2, backend=be, **kw),
    "diffmod": lambda ps, be, **kw: DiffMod(ps, lr=1e-2, len_memory=5, backend=be, **kw),
    "avgrad": lambda ps, be, **kw: AVGrad(ps, lr=1e-2, backend=be, **kw),
    "mada": lambda ps, be, **kw: MADA(ps, lr=1e-2, backend=be, **{**LEARN_ALL, **kw}),
}
SHAPES = [(4, 3), (5,), (2, 2)]
PROBES: dict[str, Callable[[str], None]] = {}


def probe(fn: Callable[[str], None]) -> Callable[[str], None]:
    PROBES[fn.__name__.removeprefix("probe_")] = fn
    return fn


# -- helpers -------------------------------------------------------------------------

def make(shapes=SHAPES, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(s).to(dtype).requires_grad_() for s in shapes]


def grads(params, scale=1.0) -> None:
    for p in params:
        p.grad = (scale * torch.randn(p.shape)).to(p.dtype)


def run(opt, params, steps=2) -> None:
    for _ in range(steps):
        grads(params)
        opt.step()


def started(kind: str, be: str):
    """Params and an optimizer of ``kind`` that has taken two steps (it holds state)."""
    params = make()
    opt = KINDS[kind](params, be)
    run(opt, params)
    return params, opt


def snapshot(opt, params):
    extra = (dict(opt.coefficients), dict(opt.hypergradients)) if isinstance(opt, MADA) else None
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()), extra


def same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        if not a.is_meta:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{path} changed")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def raises_and_changes_nothing(opt, params, call: Callable[[], object], errors=ERRORS, match: str = "") -> str:
    before = snapshot(opt, params)
    try:
        call()
    except errors as e:
        msg = str(e)
    else:
        raise AssertionError("no error raised")
    assert match.lower() in msg.lower(), f"message {msg!r} does not mention {match!r}"
    same(before, snapshot(opt, params), "after the error")
    return msg


def fresh_copy_loads(opt, params, kind: str, be: str) -> None:
    twins = [p.detach().clone().requires_grad_() for p in params]
    KINDS[kind](twins, be).load_state_dict(opt.state_dict())


# -- item 1: a parameter's dtype or device changes after it has state ---------------------

CONVERSIONS = {  # (start dtype, what the module does)
    "half": (torch.float32, torch.nn.Module.half),
    "bfloat16": (torch.float32, torch.nn.Module.bfloat16),
    "double": (torch.float32, torch.nn.Module.double),
    "float": (torch.float64, torch.nn.Module.float),
}


def _dtype_change(be: str, kind: str, conversion: str) -> None:
    start, convert = CONVERSIONS[conversion]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(start)
    twin = copy.deepcopy(model)
    opt = KINDS[kind](list(model.parameters()), be)
    other = KINDS[kind](list(twin.parameters()), be)
    gs = [[torch.randn(p.shape) for p in model.parameters()] for _ in range(3)]
    for m, o in ((model, opt), (twin, other)):
        for p, g in zip(m.parameters(), gs[0]):
            p.grad = g.to(p.dtype)
        o.step()
    # What a user expects after model.half(): the state carries on, converted as
    # a state_dict loaded into the converted model would be.
    saved = other.state_dict()
    convert(model)
    convert(twin)
    other = KINDS[kind](list(twin.parameters()), be)
    other.load_state_dict(saved)
    for g in gs[1:]:
        for m, o in ((model, opt), (twin, other)):
            for p, gi in zip(m.parameters(), g):
                p.grad = gi.to(p.dtype)
            o.step()
    new = next(model.parameters()).dtype
    state_dtype = torch.float64 if new == torch.float64 else torch.float32
    for p in model.parameters():
        assert p.dtype == new and all(v.dtype == state_dtype for k, v in opt.state[p].items() if k != "step")
        assert int(opt.state[p]["step"]) == 3
    same(snapshot(other, list(twin.parameters())), snapshot(opt, list(model.parameters())), "moved vs loaded")
    fresh_copy_loads(opt, list(model.parameters()), kind, be)


for _kind in KINDS:
    for _conv in CONVERSIONS:
        def _p(be, kind=_kind, conv=_conv):
            _dtype_change(be, kind, conv)
        PROBES[f"dtype_change_{_kind}_{_conv}"] = _p


@probe
def probe_one_param_changes_dtype(be: str) -> None:
    """One parameter leaves a bucket: the others keep their state, in a rebuilt bucket."""
    params = make()
    opt = KINDS["mada"](params, be)
    run(opt, params)
    keep = {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[1].data = params[1].data.double()
    grads(params)
    opt.step()
    assert opt.state[params[1]]["m"].dtype == torch.float64
    assert int(opt.state[params[0]]["step"]) == 3 and int(opt.state[params[1]]["step"]) == 3
    assert not torch.equal(keep["m"], opt.state[params[0]]["m"])  # stepped, from the kept state
    fresh_copy_loads(opt, params, "mada", be)


@probe
def probe_meta_param_refused(be: str) -> None:
    params = make()
    meta = torch.empty(3, device="meta", requires_grad=True)
    opt = KINDS["mada"](params + [meta], be)
    grads(params)
    meta.grad = torch.empty(3, device="meta")
    raises_and_changes_nothing(opt, params, opt.step, match="meta")
    meta.grad = None
    opt.step()


# -- item 2: shape changes ----------------------------------------------------------------

@probe
def probe_shape_change_refused(be: str) -> None:
    for kind in KINDS:
        params, opt = started(kind, be)
        old = params[0].data
        for new_shape in [(5, 3), (3, 3), (3, 4), (12,)]:  # larger, smaller, same numel twice
            params[0].data = torch.randn(new_shape)
            grads(params)
            raises_and_changes_nothing(opt, params[1:], opt.step, match="shape")
        params[0].data = old
        run(opt, params, 1)
        fresh_copy_loads(opt, params, kind, be)


# -- item 3: a zero-size parameter whose first grad comes late ------------------------------

@probe
def probe_late_zero_size_param(be: str) -> None:
    for kind in KINDS:
        params = make()
        empty = torch.empty(0, 3, requires_grad=True)
        opt = KINDS[kind](params + [empty], be)
        run(opt, params)
        for _ in range(2):
            grads(params)
            empty.grad = torch.empty(0, 3)
            opt.step()
        assert int(opt.state[empty]["step"]) == 2 and int(opt.state[params[0]]["step"]) == 4
        fresh_copy_loads(opt, params + [empty], kind, be)


# -- item 4 (optimizer side): one NaN gradient element --------------------------------------

@probe
def probe_nan_grad_element_keeps_coefficients_finite(be: str) -> None:
    params = make()
    opt = KINDS["mada"](params, be)
    run(opt, params, 3)
    k = opt.coefficients
    grads(params)
    params[0].grad[1, 1] = float("nan")
    opt.step()
    run(opt, params, 2)  # the NaN element's tangents are NaN from now on: so is every hyper-gradient
    assert opt.coefficients == k, "a non-finite hyper-gradient moved the coefficients"
    assert all(torch.isfinite(p).all() for p in params[1:]), "one NaN element poisoned other parameters"
    assert torch.isfinite(params[0].detach().view(-1)[torch.arange(12) != 4]).all()
    hyper = opt.state_dict()["mada"]["hyper"]
    assert torch.isfinite(hyper["coef"]).all() and torch.isfinite(hyper["hypergrad"]).all()


# -- item 5: add_param_group ------------------------------------------------------------------

@probe
def probe_bad_param_group_rolled_back(be: str) -> None:
    for kind in KINDS:
        params, opt = started(kind, be)
        x = torch.randn(3, requires_grad=True)
        bad_groups = [
            dict(params=[torch.randn(3, requires_grad=True)], lr=-1.0),
            dict(params=[torch.randn(3, requires_grad=True)], lr=float("nan")),
            dict(params=[torch.randn(3, dtype=torch.complex64, requires_grad=True)]),
            dict(params=[x, x]),
            dict(params=[torch.randn(1).expand(4).requires_grad_()]),
        ]
        for group in bad_groups:
            raises_and_changes_nothing(opt, params, lambda: opt.add_param_group(group))
            assert len(opt.param_groups) == 1
        run(opt, params, 1)
        opt.add_param_group(dict(params=[x], lr=1e-3))
        grads(params + [x])
        opt.step()


# -- item 6: the missing-grad index cache is bounded ---------------------------------------------

@probe
def probe_index_cache_bounded(be: str) -> None:
    assert INDEX_CACHE_SIZE <= 256  # what a bucket may hold (each entry: two small device tensors)
    size = 4  # a smaller bound here: the same code, far fewer steps
    real, flat_state.INDEX_CACHE_SIZE = flat_state.INDEX_CACHE_SIZE, size  # read as a bucket is made
    try:
        _index_cache_bounded(be, size)
    finally:
        flat_state.INDEX_CACHE_SIZE = real


def _index_cache_bounded(be: str, size: int) -> None:
    params = make([(2,)] * 12)
    opt = KINDS["adamod"](params, be)
    run(opt, params, 1)
    gen = torch.Generator().manual_seed(1)
    counts = [1] * len(params)
    for _ in range(3 * size):
        mask = torch.rand(len(params), generator=gen) < 0.5
        mask[0] = True  # at least one grad, never all (else no index is needed)
        mask[1] = False
        for p, m in zip(params, mask.tolist()):
            p.grad = torch.randn(2) if m else None
        opt.step()
        counts = [c + int(m) for c, m in zip(counts, mask.tolist())]
    (bucket,) = opt._buckets
    assert len(bucket.index_cache) == size
    assert [int(opt.state[p]["step"]) for p in params] == counts


# -- item 7: errors that used to come after something changed -------------------------------------

@probe
def probe_errors_change_nothing(be: str) -> None:
    for kind in KINDS:
        params, opt = started(kind, be)
        grads(params)
        opt.param_groups[0]["lr"] = torch.tensor(1e-2, device="meta")
        raises_and_changes_nothing(opt, params, opt.step)
        opt.param_groups[0]["lr"] = 1e-2
        for name, value in (("grad_scale", torch.tensor([1.0], dtype=torch.float64)),
                            ("found_inf", torch.zeros(2)), ("grad_scale", 2.0)):
            setattr(opt, name, value)
            raises_and_changes_nothing(opt, params, opt.step, match=name)
            assert not hasattr(opt, name), f"{name} left on the optimizer after a step that raised"
        # .data swapped for an expanded (stride-0) tensor of the same shape
        old = params[1].data
        params[1].data = torch.randn(1).expand(5)
        raises_and_changes_nothing(opt, [params[0], params[2]], opt.step, match="memory")
        params[1].data = old
        opt.step()


class _CopyFails(torch.Tensor):
    """A saved tensor whose copy into the optimizer fails (a device error, say)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("copy failed")
        return super().__torch_function__(func, types, args, kwargs or {})


@probe
def probe_load_state_dict_atomic(be: str) -> None:
    for kind in KINDS:
        params, opt = started(kind, be)
        sd = copy.deepcopy(opt.state_dict())
        run(opt, params)
        sd["state"][2]["m"] = sd["state"][2]["m"].as_subclass(_CopyFails)
        raises_and_changes_nothing(opt, params, lambda: opt.load_state_dict(sd), match="copy failed")
        run(opt, params, 1)


# -- item 8: corrupt checkpoints ------------------------------------------------------------------

def _corruptions(kind: str):
    def state(i, name, value):
        def f(sd):
            sd["state"][i][name] = torch.full_like(sd["state"][i][name], value)
        return f

    def one(i, name, index, value):
        def f(sd):
            sd["state"][i][name].view(-1)[index] = value
        return f

    def group_key(sd):
        sd["param_groups"][0]["momentum"] = 0.9  # SGD's: no optimizer here has it (betas is a group option)

    out = {"v_nan": one(1, "v", 2, float("nan")), "v_negative": one(0, "v", 0, -1.0),
           "step_nan": state(2, "step", float("nan")), "step_negative": state(0, "step", -2.0),
           "step_fraction": state(0, "step", 1.5), "unknown_group_key": group_key}
    if kind == "avgrad":
        out["vb_negative"] = one(0, "vb", 1, -0.5)

        def fixed(sd):
            sd["mada"]["hyper"]["coef"][3] = 7.0  # rho: fixed at 0 for AVGrad
        out["fixed_coefficient"] = fixed
    return out


@probe
def probe_corrupt_checkpoints_refused(be: str) -> None:
    for kind in KINDS:
        params, opt = started(kind, be)
        for name, corrupt in _corruptions(kind).items():
            sd = copy.deepcopy(opt.state_dict())
            corrupt(sd)
            try:
                raises_and_changes_nothing(opt, params, lambda: opt.load_state_dict(sd), errors=(ValueError,))
            except AssertionError as e:
                raise AssertionError(f"{kind} {name}: {e}") from None
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the untouched one still loads
        run(opt, params, 1)


# -- item 9 -----------------------------------------------------------------------------------------

@probe
def probe_found_inf_left_by_a_failed_scaler_step(be: str) -> None:
    params = make()
    opt = KINDS["mada"](params, be)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # creates the scale a step checks for
    run(opt, params)
    grads(params)
    params[0].grad[0, 0] = float("inf")  # GradScaler finds it and hands found_inf = 1 over
    opt.param_groups[0]["lr"] = -1.0
    raises_and_changes_nothing(opt, params, lambda: scaler.step(opt))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    opt.param_groups[0]["lr"] = 1e-2
    grads(params)
    before = [p.detach().clone() for p in params]
    opt.step()  # a plain step: must not be skipped by the stale found_inf
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


@probe
def probe_tensor_lr_not_checked_at_step(be: str) -> None:
    """Documented: a tensor lr is used as it is (checking it would sync the host)."""
    params = make([(6,)])
    twin = [params[0].detach().clone().requires_grad_()]
    a, b = MADA(params, learn=(), backend=be), MADA(twin, learn=(), backend=be)  # Adam: u is linear in lr
    a.param_groups[0]["lr"] = torch.tensor(-1e-2)
    b.param_groups[0]["lr"] = torch.tensor(1e-2)
    start = params[0].detach().clone()
    g = torch.randn(6)
    params[0].grad, twin[0].grad = g.clone(), g.clone()
    a.step()
    b.step()
    assert torch.allclose(params[0] - start, -(twin[0] - start)), "a negative tensor lr steps uphill"


@probe
def probe_constructor_checks(be: str) -> None:
    x = torch.randn(3, requires_grad=True)
    for make_opt in (lambda: AdaMod([x, x], backend=be), lambda: MADA([x, torch.randn(2, requires_grad=True), x], backend=be),
                     lambda: MADA([x], learn=("beta1", "beta1"), backend=be),
                     lambda: MADA([x], betas=(0.9, 0.99995), backend=be)):  # a learned beta2 outside its box
        try:
            make_opt()
        except ValueError:
            continue
        raise AssertionError("accepted")
    # fixed coefficients need only be valid, not inside the learning box
    AVGrad([x], betas=(0.9, 0.99995), backend=be)
    MADA([x], betas=(0.9995, 0.99995), rho=0.0, learn=("c",), backend=be)


# -- item 14: CUDA graph capture (the logic, with the capture check forced on) ------------------------

@probe
def probe_capture_refusals(be: str) -> None:
    real = optimizer_module._capturing
    params = make()
    opt = KINDS["mada"](params, be)
    try:
        optimizer_module._capturing = lambda devices: True
        grads(params)
        raises_and_changes_nothing(opt, params, opt.step, errors=(RuntimeError,), match="capture")  # first step
        optimizer_module._capturing = real
        run(opt, params)
        optimizer_module._capturing = lambda devices: True
        grads(params)
        raises_and_changes_nothing(opt, params, opt.step, errors=(RuntimeError,), match="lr")  # a float lr
        opt.param_groups[0]["lr"] = torch.tensor(1e-2)
        raises_and_changes_nothing(opt, params, opt.step, errors=(RuntimeError,), match="lr")  # on the host
        (bucket,) = opt._buckets
        try:
            opt._step_index(bucket, [0, 2], capturing=True)
        except RuntimeError as e:
            assert "capture" in str(e)
        else:
            raise AssertionError("a new missing-grad pattern was accepted under capture")
        assert not bucket.index_cache
    finally:
        optimizer_module._capturing = real


def main(backend: str, names: list[str]) -> None:
    for name in names:
        print(f"START {name}", flush=True)
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            PROBES[name](backend)
        except Exception as e:  # noqa: BLE001 - reported, and the next probe runs
            where = traceback.extract_tb(e.__traceback__)[-1]
            why = f"{type(e).__name__}: {e} (line {where.lineno})".replace("\n", " ")
            print(f"FAIL {name}: {why}", flush=True)
        else:
            print(f"PASS {name} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--list":
        print("\n".join(PROBES))
    else:
        torch.set_default_dtype(torch.float32)
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        main(sys.argv[1], sys.argv[2:] or list(PROBES))
