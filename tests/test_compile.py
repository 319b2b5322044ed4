"""torch.compile around our optimizers: a compiled training step (or a compiled
``opt.step``) gives the eager result, dynamo never traces or breaks inside
mada_fused, and an lr schedule (float or tensor lr) never recompiles."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._dynamo.utils

import mada_fused

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
counts = pytest.importorskip("bench.compile_counts", reason="bench/ is not importable (installed wheel without the checkout)")

OPTIMIZERS = sorted(counts.OPTIMIZERS)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def state_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    out += [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if isinstance(opt, mada_fused.MADA):
        out.append(opt._hyper.coef.clone())
    return out


def run(name: str, steps: int, compiled: str | None, tensor_lr: bool = False, backend: str = "cpu"):
    """``steps`` of training under a cosine schedule; ``compiled`` is None (eager),
    a torch.compile backend for the whole train step, or "step:<backend>" for
    ``torch.compile(opt.step)`` alone."""
    moving = {"hyper_warmup": 0} if name == "MADA" else {}  # the coefficients move from step 2 on
    model, opt, sched, x, y = counts.setup(name, tensor_lr, backend, **moving)
    counts.train(model, opt, sched, x, y, steps, compiled)
    return opt


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "step:aot_eager"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_training_equals_eager(name, compile_backend):
    want = state_of(run(name, 4, None))
    got = state_of(run(name, 4, compile_backend))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dynamo_never_traces_into_mada_fused(name):
    model, opt, _, x, y = counts.setup(name, tensor_lr=False)
    train = counts.train_step_of(model, opt)
    with counts.Watch() as w:
        compiled = torch.compile(train, backend="eager")
        for _ in range(3):
            compiled(x, y)
    assert w.frames, "the watch saw no compiled frame: it would see none of ours either"
    assert w.breaks, "the watch saw no graph break (backward() breaks): it would see none of ours either"
    assert w.in_package(w.frames) == []
    assert w.in_package(w.breaks) == []
    explained = torch._dynamo.explain(counts.train_step_of(model, opt))(x, y)
    ours = [f for r in explained.break_reasons for f in r.user_stack if counts.PACKAGE_DIR in f.filename]
    assert ours == []


@pytest.mark.parametrize("tensor_lr", [True, False], ids=["tensor_lr", "float_lr"])
def test_fifty_step_schedule_never_recompiles(tensor_lr):
    cnt = torch._dynamo.testing.CompileCounter()
    model, opt, sched, x, y = counts.setup("MADA", tensor_lr)
    eager_model, eager_opt, eager_sched, _, _ = counts.setup("MADA", tensor_lr)
    compiled = torch.compile(counts.train_step_of(model, opt), backend=cnt)
    eager = counts.train_step_of(eager_model, eager_opt)
    lrs = set()
    # A recompile would now raise instead of falling back to eager.
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), counts.Watch() as w:
        for i in range(50):
            compiled(x, y)
            eager(x, y)
            if i == 0:
                graphs, frames = cnt.frame_count, len(w.frames)
            lrs.add(float(opt.param_groups[0]["lr"]))
            sched.step()
            eager_sched.step()
    assert len(lrs) == 50  # the lr did change every step
    assert w.recompiles == 0 and w.limit_hits == 0
    assert (cnt.frame_count, len(w.frames)) == (graphs, frames)
    for g, e in zip(state_of(opt), state_of(eager_opt)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
