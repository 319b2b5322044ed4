"""Gradient release: each parameter steps as soon as its gradient is ready.

``grad_release(opt)`` hooks every parameter of ``opt`` with
``Tensor.register_post_accumulate_grad_hook``. During ``loss.backward()`` the
hook steps that one parameter and frees its gradient (``p.grad = None``), so
no ``.grad`` outlives its parameter's step and the model's gradients never
all exist at once.

MADA's coefficients are shared by every parameter and move once per
iteration. Its lagged hyper order (docs/spec.md section 2.4) already reads
``k`` in the pass and moves it afterwards: here every per-parameter step reads
the same ``k`` and leaves its partial sum of ``g * du/dk``; when the backward
pass ends (a callback queued on autograd's engine), the partial sums are added
in the order a whole step would add them and ``k`` moves once. The exact order
moves ``k`` before any parameter steps, which needs every gradient first, so
it is refused.
"""
from __future__ import annotations

import weakref

import torch

from .mada import MADA
from .optimizer import FusedOptimizer

# Optimizer -> its hooks; kept here, not on the optimizer, which deepcopy and
# pickle copy whole.
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GradRelease:
    """The hooks :func:`grad_release` registered; :meth:`remove` takes them off."""

    def __init__(self, opt: FusedOptimizer) -> None:
        if not isinstance(opt, FusedOptimizer):
            raise TypeError(f"grad_release needs a mada_fused optimizer, got {type(opt).__name__}")
        if isinstance(opt, MADA) and opt._exact and opt._kcfg.learn:
            raise ValueError(
                "grad_release needs MADA(hyper_order='lagged'): with 'exact' the coefficients move "
                "before any parameter steps, which needs every gradient of the iteration first"
            )
        if opt in _ACTIVE:
            raise RuntimeError("this optimizer's gradients are already released; remove() the first hooks")
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        devices = {p.device for p in params}
        if len(devices) > 1:
            # Autograd runs one thread per device: hooks of two devices could step at
            # once, and a step steps every parameter that holds a gradient.
            raise ValueError(f"grad_release needs all parameters on one device, got {sorted(map(str, devices))}")
        if any(p.grad is not None for p in params):
            raise RuntimeError("grad_release: some parameters still hold gradients; step or zero_grad() first")
        self._opt = opt
        self._params = params
        self._task: int | None = None  # the backward pass whose iteration is open
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        _ACTIVE[opt] = self

    # Inside a compiled training step the backward pass (and with it this hook)
    # may run under dynamo's frame hook; the step must not be traced (see step()).
    @torch.compiler.disable
    def _hook(self, param: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first parameter of this backward pass
            self.end_iteration()  # one left open by a backward pass that raised
            self._task = task
            # State for all at once, as a whole step makes it: one bucket per
            # (device, dtype), not one per parameter (a parameter that never
            # gets a gradient gets zero state too, which a whole step would not make).
            missing = [p for p in self._params if id(p) not in self._opt._home]
            if missing:
                self._opt._allocate(missing)
            if isinstance(self._opt, MADA):
                self._opt._open_release()
            torch.autograd.Variable._execution_engine.queue_callback(self.end_iteration)
        self._opt._eager_step()  # every other parameter's grad is None: this one steps
        param.grad = None

    def end_iteration(self) -> None:
        """Move MADA's coefficients for the iteration whose parameters have stepped.

        Called when the backward pass ends; calling it again does nothing.
        """
        if self._task is None:
            return
        self._task = None
        if isinstance(self._opt, MADA):
            self._opt._close_release()

    def remove(self) -> None:
        """Finish an open iteration, take the hooks off; ``step()`` works as usual again."""
        self.end_iteration()
        for h in self._handles:
            h.remove()
        self._handles = []
        _ACTIVE.pop(self._opt, None)

    def __enter__(self) -> "GradRelease":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def grad_release(opt: FusedOptimizer) -> GradRelease:
    """Step each of ``opt``'s parameters from its post-accumulate-grad hook and free its grad.

    Every parameter of ``opt`` that requires grad is hooked; a training loop then is
    ``loss.backward()`` alone (no ``step()``, no ``zero_grad()``). Use as a context
    manager or call ``remove()`` on the result. Not supported: gradient clipping by a
    global norm, GradScaler (``found_inf`` is known only after the whole backward
    pass), gradient accumulation over micro-batches (each backward steps), DDP and
    FSDP2 (the hook sees a rank's gradient before it is reduced), closures, and
    MADA's ``hyper_order="exact"`` (refused).
    """
    return GradRelease(opt)
