"""The conformance table, in the spirit of torch's OptimizerInfo / optim_db: every
optimizer mode each backend must compute like tests/spec_model.py (the float64
oracle) and like backend="reference". test_conformance.py runs every present
backend on every case in every dtype the case lists.

A case is an optimizer class and its arguments plus a schedule: how many steps,
whether GradScaler's grad_scale/found_inf are handed in (one step is skipped),
whether a parameter misses its grad on a step, and whether the layout is large
enough for segments to span a backend's chunk. Every case runs with two
parameter groups (the second with its own lr and weight decay) over odd shapes
including a zero-size tensor.

Tolerances, in eps: the machine epsilon of the parameter dtype for parameters, of the state
dtype (float32 for 16-bit parameters) for everything else. Every step starts from the
backend's own state: the oracle computes the step from a float64 copy of it, with the
constants an implementation in the state dtype holds (coefficients, betas, lr and eps rounded
to it; powers beta^t from the float64 coefficients, as csrc/mada_math.h takes them), and a
reference optimizer is loaded with it; so one step's rounding is compared, never a drift.
- parameters and state buffers against the reference: 2 eps of the tensor's largest value
  (both evaluate the header's terms in the same order; the header multiplies by reciprocals
  where the reference divides, and torch's CPU sqrt is not always correctly rounded). A
  16-bit parameter may round to the other neighbour: 1 ulp <= eps of the largest.
- against the oracle: parameters 2 eps of the largest |value| before or after the step,
  state buffers 16 eps of that (an update's terms may be larger than its result; s
  carries eta's rounding; seen: 12 eps). Both plus the bias corrections' share: they are
  taken in float64, and one ulp of beta^t is amplified by beta^t / (1 - beta^t) (333 at
  t = 3 with beta2 = 0.999): 4 float64 eps times that, of the step or of the buffer.
- tangent rows against the oracle: rows are differences of terms that cancel (at t = 1 the
  beta1 and beta2 rows are exactly 0 and gamma's is etah*A - lr ~ 1e-8 from terms of 1e-2),
  so rounding is amplified and no relative bound fits: 32 eps of (the row's largest |value|
  + lr / (1 - beta) for the beta1 and beta2 rows, + lr for the others), the size of those
  terms (a grad far above its running RMS makes them up to ~10x larger; seen: 21 eps). In
  float64, 1024 eps: one ulp of beta^t in the float64 bias corrections (torch's and libm's
  pow differ) is amplified by t / (1 - beta^t)^2 in these rows (seen: 420 eps with learned,
  i.e. arbitrary, betas at t = 3), still 2^-42 of the row scale.
  Triton keeps its tighter bound: within 4x the reference's own error plus 4 eps of that.
- hyper-gradients: against the exact float64 dot of the backend's own stored tangents with
  the step's grads, and against the reference's h: 8 eps of sum |g * T| (the rounding of the
  products and sums only). Coefficients: hyper_lr times that (clip and box are
  1-Lipschitz), plus 4 ulps.
Backends whose arithmetic rounds differently document their own bounds in TARGETS.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mada_fused import MADA, AVGrad, AdaMod, DiffMod

import spec_model as sm

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    kwargs: dict
    dtypes: tuple[torch.dtype, ...] = (F32, F64)
    backends: tuple[str, ...] | None = None  # None: every backend
    steps: int = 4
    amp: bool = False  # grads scaled by 64, grad_scale/found_inf set; step 2 has an inf and is skipped
    drop: bool = False  # the first param has no grad at step 1, the last none at step 0 (starts late)
    big: bool = False  # the backend's large layout: segments span its chunk boundaries
    strided: bool = False  # 2-D grads are transposed views (other strides than the param)

    def applies(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    @property
    def learn(self) -> tuple[str, ...]:
        if not issubclass(self.cls, MADA) or self.cls is AVGrad:
            return ()
        return tuple(n for n in sm.CANON if n in self.kwargs.get("learn", sm.CANON))


ALL = sm.CANON
FULL = dict(lr=1e-2, beta3=0.5, rho=0.6, c=0.7, gamma=0.8, learn=ALL, hyper_warmup=0)
# Warm-up of 2 and fast hyper-rates: coefficients start moving mid-run.
LEARN = dict(lr=1e-2, betas=(0.85, 0.98), beta3=0.3, rho=0.6, c=0.7, gamma=0.8, hyper_warmup=2,
             hyper_lr={n: 1e-2 for n in ALL}, learn=ALL)
LOW = (F32, F64, BF16, F16)

CASES: dict[str, Case] = {c.name: c for c in [
    # MADA's corners and fixed interior points (nothing learned: no tangents).
    Case("adam_corner", MADA, dict(lr=1e-2, learn=(), weight_decay=0.1), big=True, strided=True),
    Case("adam_corner_amp", MADA, dict(lr=1e-2, learn=()), amp=True, dtypes=(F32, F16)),
    Case("lion", MADA, dict(lr=1e-3, gamma=0.0, learn=())),
    Case("fixed_interior", MADA, dict(FULL, learn=())),
    # The clip alone runs the one-loop CPU kernel, a clipped interior point the two-loop one.
    Case("clip_fixed_max", MADA, dict(lr=1e-2, learn=(), mod_beta=0.9, maximize=True)),
    Case("clip_interior_fixed", MADA, dict(LEARN, learn=(), mod_beta=0.9)),
    # Learning: every row, subsets, both orders, vbar detached, maximize, the clip.
    Case("full_mod", MADA, dict(FULL, mod_beta=0.9), dtypes=LOW),
    Case("full_mod_amp_drop", MADA, dict(FULL, mod_beta=0.9), amp=True, drop=True, dtypes=LOW),
    Case("learn_all_warmup", MADA, dict(LEARN, mod_beta=0.9, weight_decay=0.05), dtypes=(F64,), big=True,
         strided=True),
    Case("learn_all_small", MADA, dict(LEARN, mod_beta=0.9, weight_decay=0.05), dtypes=(F32, BF16, F16)),
    Case("learn_all_amp", MADA, dict(LEARN), amp=True),
    Case("exact_detach_max", MADA, dict(FULL, vbar="detach", hyper_order="exact", maximize=True),
         amp=True, drop=True, dtypes=LOW),
    Case("exact_detach_max_warmup", MADA, dict(LEARN, hyper_order="exact", vbar="detach", maximize=True)),
    Case("exact_mod", MADA, dict(FULL, mod_beta=0.9, hyper_order="exact", hyper_clip=1e-3)),
    # Fast hyper-rates against the authors' boxes: coefficients are projected back.
    Case("boxed", MADA, dict(FULL, betas=(0.9, 0.95), bounds="paper", hyper_lr={n: 1.0 for n in ALL})),
    Case("learn_beta1_only", MADA, dict(lr=1e-2, learn=("beta1",), hyper_warmup=0)),
    Case("subset_rows", MADA, dict(lr=1e-2, gamma=0.7, learn=("beta2", "gamma"), hyper_warmup=0)),
    # The other optimizers.
    Case("avgrad", AVGrad, dict(lr=1e-2, weight_decay=0.01), drop=True),
    Case("adamod", AdaMod, dict(lr=1e-2, beta3=0.9, weight_decay=0.01), dtypes=LOW, big=True),
    Case("adamod_default_amp", AdaMod, dict(lr=1e-2, weight_decay=0.01), amp=True, drop=True),
    Case("diffmod", DiffMod, dict(lr=1e-2, len_memory=10), strided=True),
    Case("diffmod_amp_drop", DiffMod, dict(lr=1e-2), amp=True, drop=True, dtypes=LOW),
    Case("diffmod_max_amp", DiffMod, dict(lr=1e-2, len_memory=10, maximize=True), amp=True, dtypes=(F32, BF16)),
]}

# The second parameter group: its own lr (times the case's) and weight decay.
GROUP2 = dict(lr_factor=0.3, weight_decay=0.02)
AMP_SCALE = 64.0  # grads times the scale stay finite in float16
SKIP_STEP = 2


def lognormal(shape) -> torch.Tensor:
    """Random float64 values of log-normal magnitude, so that element-wise switches
    (sign(gh^2 - v'), the AdaMod clip) go both ways."""
    return torch.exp(0.7 * torch.randn(shape, dtype=torch.float64)) * torch.randn(shape, dtype=torch.float64)


def random_grads(shapes, steps, dtype, device, scale=1.0) -> list[list[torch.Tensor]]:
    return [[(scale * lognormal(s)).to(dtype).to(device) for s in shapes] for _ in range(steps)]


# -- where each backend runs --------------------------------------------------------------------
# Odd sizes, a zero-size tensor and many small ones.
SMALL = [(3, 5), (0,), (7,), (1,), (2, 3, 4)] + [(k % 13 + 1,) for k in range(12)]


@dataclass(frozen=True)
class Target:
    """How the suite runs one backend: device, layouts, environment, rounding bounds."""

    device: str = "cpu"
    small: list = field(default_factory=lambda: SMALL)
    # Fills most of the CPU's first 64K-element chunk, so the chunk boundary falls inside
    # a later small tensor.
    big: list = field(default_factory=lambda: [(65521,)] + SMALL)
    env: dict = field(default_factory=dict)
    tol: dict = field(default_factory=dict)  # overrides of TOL's entries for this backend

    def shapes(self, case: Case) -> list:
        return self.big if case.big else self.small


# Tolerances in eps of the dtype they apply to (module docstring).
TOL = dict(param=2.0, state=2.0, oracle_state=16.0, hyper=8.0, tangent=32.0, tangent_f64=1024.0,
           tangent_vs_ref=None, tangent_vs_ref_err=None)

_CUDA = torch.cuda.is_available()
# Without a GPU Triton runs under its interpreter on CPU tensors (~0.1 s per block): layouts
# small enough for that, still two chunks, full blocks and masked tails. On a GPU, compiled.
_TRITON = Target(env={"TRITON_INTERPRET": "1"}, small=[(37,), (0,), (9, 13), (1,)],
                 big=[(1100,), (37,), (0,), (9, 13)]) if not _CUDA else Target(
    device="cuda", env={"MADA_TRITON_CONFIG": "1024,8"}, small=SMALL, big=[(1 << 20,), (4097,)] + SMALL)
# The CUDA kernels multiply by reciprocals where the reference divides and nvcc may contract
# a*b + c into one FMA, so any op may round one ulp apart: 8 ulps of the bucket's scale per
# step; tangent rows within 2^-8 of (row scale + lr) of the reference's (rows are rounding
# noise where they cancel to 0); h from fp64 products: 1e-10 of sum |g * T|.
_GPU_TOL = dict(param=8.0, state=8.0, hyper_rel=1e-10, tangent_vs_ref=2.0**-8)

# Several 2K-element CUDA chunks with segments spanning chunk ends, tails, lone tiny tensors.
_CUDA_BIG = [(5000,), (7,), (37, 129), (1,), (0,), (3001,)] + SMALL

# Backends not named here run with Target()'s defaults.
TARGETS: dict[str, Target] = {
    "triton": dataclasses.replace(_TRITON, tol=dict(tangent_vs_ref_err=4.0)),
    "cuda": Target(device="cuda", big=_CUDA_BIG, tol=_GPU_TOL),
    # The same kernel sources built by the host compiler: CUDA's chunking on CPU tensors, its
    # reciprocals (8 ulps of params and state, as on the GPU), and the oracle's bounds for the
    # tangent rows and h, which the GPU's FMA contraction would loosen.
    "cuda_on_cpu": Target(big=_CUDA_BIG, tol=dict(param=8.0, state=8.0)),
}


def target(backend: str) -> Target:
    return TARGETS.get(backend, Target())


def tolerance(backend: str, name: str):
    return {**TOL, **target(backend).tol}.get(name)
