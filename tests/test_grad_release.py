"""grad_release: stepping each parameter from its post-accumulate-grad hook gives
what whole steps with the same gradients give (MADA's coefficients included),
leaves no gradient behind, and refuses what it cannot do."""
from __future__ import annotations

import pytest
import torch

import mada_fused
from mada_fused import AdaMod, AVGrad, DiffMod, MADA, grad_release

# MADA moving all six coefficients from the second iteration on (every state
# buffer and tangent row in use), and the three fixed optimizers.
OPTIMIZERS = {
    "MADA": lambda groups, **kw: MADA(groups, lr=1e-2, beta3=0.5, rho=0.5, c=0.5, gamma=0.7, mod_beta=0.9,
                                       hyper_warmup=0, **kw),
    "AVGrad": lambda groups, **kw: AVGrad(groups, lr=1e-2, **kw),
    "AdaMod": lambda groups, **kw: AdaMod(groups, lr=1e-2, **kw),
    "DiffMod": lambda groups, **kw: DiffMod(groups, lr=1e-2, **kw),
}
BACKENDS = ["reference", "cpu"]
ITERATIONS = 5


def setup(name: str, backend: str, state_dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.1}]
    return model, OPTIMIZERS[name](groups, backend=backend, state_dtype=state_dtype)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(ITERATIONS)]


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def everything(opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    out += [v.clone() for s in opt.state.values() for v in s.values()]
    if isinstance(opt, MADA):
        hyper = opt.state_dict()["mada"]["hyper"]
        out += [hyper["coef"], hyper["hypergrad"], hyper["steps"]]
    return out


# bf16 state: a per-parameter step draws the rounding bits of the same (step, buffer,
# bucket element) as the whole step, so it stores the same bits.
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_released_steps_equal_whole_steps(name, backend, state_dtype):
    model, opt = setup(name, backend, state_dtype)
    for batch in batches():
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    want = everything(opt)

    model, opt = setup(name, backend, state_dtype)
    with grad_release(opt):
        for batch in batches():
            loss_of(model, batch).backward()
            assert all(p.grad is None for p in model.parameters())
    got = everything(opt)

    if name == "MADA":  # the coefficients did move, counted once per iteration
        assert float(got[-1]) == ITERATIONS
        assert not torch.equal(got[-3], everything(setup(name, backend)[1])[-3])
    # The reference adds the partial sums of g * du/dk per parameter in bucket order
    # either way: bitwise. The cpu backend sums in fixed chunks of the call's
    # elements, so one parameter per call groups the float64 sum differently
    # (its last bits; these tiny layers happen to sum exactly).
    tol = {"rtol": 0, "atol": 0} if backend == "reference" else {}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def test_exact_hyper_order_is_refused_and_nothing_is_hooked():
    model = torch.nn.Linear(3, 2)
    opt = MADA(model.parameters(), hyper_order="exact", backend="reference")
    with pytest.raises(ValueError, match="hyper_order='lagged'"):
        grad_release(opt)
    model(torch.ones(1, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook stepped and freed them
    assert opt.state_dict()["state"] == {}
    model.zero_grad()
    grad_release(MADA(model.parameters(), hyper_order="exact", learn=())).remove()  # nothing learned: no order


def test_refusals():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="mada_fused optimizer"):
        grad_release(torch.optim.AdamW(model.parameters()))
    opt = AdaMod(model.parameters(), backend="reference")
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="still hold gradients"):
        grad_release(opt)
    opt.zero_grad()
    on_meta = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="on one device"):
        grad_release(AdaMod([*model.parameters(), *on_meta.parameters()], backend="reference"))
    release = grad_release(opt)
    with pytest.raises(RuntimeError, match="already released"):
        grad_release(opt)
    release.remove()


def test_remove_gives_back_ordinary_stepping():
    model, opt = setup("MADA", "reference")
    data = batches()
    release = grad_release(opt)
    loss_of(model, data[0]).backward()
    release.remove()
    loss_of(model, data[1]).backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert float(opt.state_dict()["mada"]["hyper"]["steps"]) == 2


def test_released_steps_inside_a_compiled_backward_equal_eager():
    """The hook runs outside dynamo's trace (as step() does), also when the
    backward pass runs from a compiled function."""
    out = []
    for compiled in (False, True):
        model, opt = setup("MADA", "cpu")
        train = lambda batch: loss_of(model, batch).backward()  # noqa: E731
        if compiled:
            torch._dynamo.reset()
            train = torch.compile(train, backend="aot_eager")
        with grad_release(opt):
            for batch in batches():
                train(batch)
        out.append(everything(opt))
    for g, w in zip(*out, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
