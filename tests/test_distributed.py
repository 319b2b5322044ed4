"""torch.distributed: FSDP2 / DTensor shards, DDP, and DCP checkpoints, on CPU with gloo.

One module-scoped fixture spawns two ranks once (starting processes is most of
the cost) and runs every scenario there; each test compares one scenario's
results with a single process that sees the same global batch.
"""
from __future__ import annotations

import datetime
import io
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from mada_fused import MADA, AdaMod, AVGrad, DiffMod

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        pytest.skip("FSDP2 (fully_shard) is not available in this torch", allow_module_level=True)

WORLD = 2
STEPS = 12
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
# Learning on from the first step, every state allocated, hyper-rates large enough
# that the coefficients travel (beta2: 0.999 -> 0.959 in 12 steps).
MADA_KW = dict(lr=1e-2, beta3=0.3, rho=0.7, c=0.9, gamma=0.8, mod_beta=0.9, weight_decay=0.01,
               hyper_warmup=0, hyper_lr=dict(beta1=0.05, beta2=0.05, beta3=0.1, rho=0.1, c=0.1, gamma=0.1))
OTHERS = {"AdaMod": (AdaMod, dict(lr=1e-2, beta3=0.9)), "DiffMod": (DiffMod, dict(lr=1e-2, len_memory=10)),
          "AVGrad": (AVGrad, dict(lr=1e-2))}
# bf16 state (docs/spec.md 5.1) needs fp32 parameters (fp64 ones keep fp64 state). A seed
# other than the default, so that resuming depends on the checkpoint restoring it.
BF16_STATE = dict(state_dtype=BF16, sr_seed=7)
# Manually sharded DTensors: uneven (5 rows: 3 + 2), along dim 1, and empty on rank 1.
SHAPES = [((5, 7), 0), ((4, 6), 1), ((1, 3), 0), ((3,), 0)]
# 8-bit state (docs/spec.md 5.4) needs fp32 parameters of 4,096 elements or more: a hidden
# layer of 601 puts the first weight (4,207) in 8-bit, sharded 301 + 300 rows (2,107 and
# 2,100 elements, so its blocks end mid-row and a single process's would straddle the
# shards), and keeps the others (601 or fewer) in fp32.
Q8, HIDDEN_Q8 = dict(state_dtype="8bit"), 601
# The DCP runs with 8-bit state: (optimizer, storage options), MADA with 8-bit tangent rows too (spec 5.5).
Q8_DCP = {"MADA": ("MADA", Q8), "AdaMod": ("AdaMod", Q8), "MADA_tangents": ("MADA", dict(Q8, tangent_dtype="8bit"))}
# Hand-sharded for 8-bit: shards of 4,096 or more (66 + 65 rows or columns), and a small one.
SHAPES_Q8 = [((131, 70), 0), ((70, 131), 1), ((5, 7), 0)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_model(dtype: torch.dtype, hidden: int = 5) -> torch.nn.Module:
    """7 -> 5 -> 1: under FSDP2 on 2 ranks the 5-row weight splits 3 + 2 and the
    1-row weight and bias are empty on rank 1."""
    m = torch.nn.Sequential(torch.nn.Linear(7, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).to(dtype)
    g = _gen(0)
    with torch.no_grad():  # the same start in every process, whatever its default dtype
        for p in m.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return m


def batches(dtype: torch.dtype, steps: int = STEPS) -> list:
    g = _gen(1)
    return [(torch.randn(8, 7, generator=g, dtype=F64).to(dtype), torch.randn(8, 1, generator=g, dtype=F64).to(dtype))
            for _ in range(steps)]


def train(model, opt, data, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Each rank takes its slice of the global batch; returns the coefficient trajectory."""
    coefs = []
    for x, y in data:
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        coefs.append(opt._hyper.coef.clone() if isinstance(opt, MADA) else torch.zeros(6, dtype=F64))
    return torch.stack(coefs)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def manual_grads(dtype: torch.dtype, steps: int = STEPS, shapes: list = SHAPES) -> list:
    g = _gen(2)
    return [[torch.randn(s, generator=g, dtype=F64).to(dtype) for s, _ in shapes] for _ in range(steps)]


def manual_params(dtype: torch.dtype, shapes: list = SHAPES) -> list:
    g = _gen(3)
    return [torch.randn(s, generator=g, dtype=F64).to(dtype).requires_grad_() for s, _ in shapes]


def run_manual(opt, params, grads, cut=lambda g, i: g.clone()) -> torch.Tensor:
    """Steps with given full gradients, ``cut(grad, i)`` down to parameter i's shard."""
    coefs = []
    for row in grads:
        for i, (p, g) in enumerate(zip(params, row)):
            p.grad = cut(g, i)
        opt.step()
        coefs.append(opt._hyper.coef.clone() if isinstance(opt, MADA) else torch.zeros(6, dtype=F64))
    return torch.stack(coefs)


def shard_of(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``t`` as Shard(dim) cuts it (torch.chunk's split)."""
    return t.detach().chunk(WORLD, dim)[rank].contiguous()


# --------------------------------------------------------------------------- #
# What the two ranks run
# --------------------------------------------------------------------------- #

def _fsdp(mesh, dtype, hidden=5):
    m = make_model(dtype, hidden)
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _scenarios(rank: int, mesh, ckpt_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils._pytree import tree_map_only

    from mada_fused import distributed as md

    out = {}

    def fsdp_mada(dtype, on=mesh, hidden=5, **storage):
        m = _fsdp(on, dtype, hidden)
        opt = MADA(m.parameters(), **MADA_KW, **storage)
        coefs = train(m, opt, batches(dtype), rank, WORLD)
        st = opt.state[m[0].weight]
        layout = {k: (type(v).__name__, str(getattr(v, "placements", None)), str(v.dtype), tuple(v.shape))
                  for k, v in st.items()}
        return dict(coefs=coefs, params=[full(p) for p in m.parameters()], groups=len(opt._shard_sum.groups),
                    layout=layout, local=[p.to_local().shape for p in m.parameters()],
                    state_dtypes=[str(opt.state[p]["m"].dtype) for p in m.parameters()])

    def manual_q8(cls, kw):
        # Each shard's blocks are its own: the single-process twin steps the shards as parameters.
        dims = [d for _, d in SHAPES_Q8]
        live = [distribute_tensor(p.detach(), mesh, [Shard(dims[i])]).requires_grad_()
                for i, p in enumerate(manual_params(F32, SHAPES_Q8))]
        opt = cls(live, **kw, **Q8)
        coefs = run_manual(opt, live, manual_grads(F32, 6, SHAPES_Q8),
                           lambda t, i: distribute_tensor(t.detach(), mesh, [Shard(dims[i])]))
        state = [{k: md.local_tensor(v).clone() for k, v in opt.state[p].items()} for p in live]
        return dict(coefs=coefs, params=[p.to_local() for p in live], state=state)

    def fsdp_other(name):
        cls, kw = OTHERS[name]
        m = _fsdp(mesh, F64)
        train(m, cls(m.parameters(), **kw), batches(F64), rank, WORLD)
        return dict(params=[full(p) for p in m.parameters()])

    def ddp_mada():
        m = DistributedDataParallel(make_model(F64))
        opt = MADA(m.parameters(), **MADA_KW)
        coefs = train(m, opt, batches(F64), rank, WORLD)
        params = [full(p) for p in m.module.parameters()]
        return dict(coefs=coefs, params=params, groups=len(opt._shard_sum.groups))

    def manual(explicit):
        # DTensors from distribute_tensor (placements FSDP2 never makes), or plain
        # local shards with an explicit process_group (sharding MADA cannot see).
        dims = [d for _, d in SHAPES]
        if explicit:
            def cut(t, i):
                return t.detach().tensor_split(WORLD, dims[i])[rank].clone()

            live = [cut(p, i).requires_grad_() for i, p in enumerate(manual_params(F64))]
            opt = MADA(live, process_group=dist.group.WORLD, **MADA_KW)
        else:
            def cut(t, i):
                return distribute_tensor(t.detach(), mesh, [Shard(dims[i])])

            live = [cut(p, i).requires_grad_() for i, p in enumerate(manual_params(F64))]
            opt = MADA(live, process_group=mesh, **MADA_KW)
        coefs = run_manual(opt, live, manual_grads(F64), cut)
        return dict(coefs=coefs, params=[p.detach() for p in live] if explicit else [full(p) for p in live])

    def dcp_resume(name, dtype=F64, hidden=5, **extra):
        cls, kw = (MADA, MADA_KW) if name == "MADA" else OTHERS[name]
        where = os.path.join(ckpt_dir, "-".join([name, str(dtype), *(f"{k}={v}" for k, v in sorted(extra.items()))]))
        data = batches(dtype)
        m = _fsdp(mesh, dtype, hidden)
        opt = cls(m.parameters(), **kw, **extra)
        train(m, opt, data[:5], rank, WORLD)
        sd = {"model": get_model_state_dict(m), "optim": md.get_optimizer_state_dict(m, opt)}
        dcp.save(sd, checkpoint_id=where)
        # What was saved, whole (8-bit state: its DCP form), for resuming on one rank.
        saved = {k: {n: full(t) for n, t in v.items()} for k, v in sd["optim"]["state"].items()}
        saved_params = {n: full(t) for n, t in sd["model"].items()}
        # This rank's state as saved (what a step may overwrite, tangent rows, is checked on loading).
        snapshot = [{k: md.local_tensor(v).clone() for k, v in opt.state[p].items()} for p in m.parameters()]
        straight = train(m, opt, data[5:], rank, WORLD)
        m2 = _fsdp(mesh, dtype, hidden)  # back at the initial weights
        # fresh: no state until set_optimizer_state_dict, and the default sr_seed until then too
        opt2 = cls(m2.parameters(), **kw, **{k: v for k, v in extra.items() if k != "sr_seed"})
        sd = {"model": get_model_state_dict(m2), "optim": md.get_optimizer_state_dict(m2, opt2)}
        dcp.load(sd, checkpoint_id=where)
        set_model_state_dict(m2, sd["model"])
        md.set_optimizer_state_dict(m2, opt2, sd["optim"])
        loaded = all(sorted(st) == sorted(opt2.state[q]) and all(
            torch.equal(t, md.local_tensor(opt2.state[q][k])) for k, t in st.items())
            for st, q in zip(snapshot, m2.parameters()))
        resumed = train(m2, opt2, data[5:], rank, WORLD)
        pairs = list(zip(m.parameters(), m2.parameters()))

        def same_state(o1, o2, pairs=pairs):
            return all(sorted(o1.state[p]) == sorted(o2.state[q]) and all(
                torch.equal(md.local_tensor(o1.state[p][k]), md.local_tensor(o2.state[q][k])) for k in o1.state[p])
                for p, q in pairs)

        same_params = all(torch.equal(p.to_local(), q.to_local()) for p, q in pairs)
        out = dict(coefs=torch.stack([straight, resumed]), same_state=same_state(opt, opt2), same_params=same_params,
                   loaded=loaded,
                   names=sorted(opt2.state[m2[0].weight]),
                   dtypes={k: str(v.dtype) for k, v in opt2.state[m2[0].weight].items()})
        if extra.get("state_dtype") == "8bit":
            # A rank's own state_dict (8-bit codes as DTensors, its scales plain) saved and loaded
            # back. Cloned first: torch 2.13 cannot pickle a DTensor view with a storage offset.
            buf = io.BytesIO()
            torch.save(tree_map_only(torch.Tensor, torch.clone, opt2.state_dict()), buf)
            opt3 = cls(m2.parameters(), **kw, **extra)
            opt3.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
            twice = [(q, q) for q in m2.parameters()]
            out.update(plain_reload=same_state(opt2, opt3, twice), where=where, saved=saved,
                       saved_params=saved_params, straight_params=[
                           full(p) for p in m.parameters()])
        return out

    def mixed_rejected():
        m = _fsdp(mesh, F64)
        mixed = [*m.parameters(), torch.zeros(3, requires_grad=True)]
        AVGrad(mixed)  # nothing learned, nothing summed: fine
        try:
            MADA(mixed, **MADA_KW)
        except ValueError as e:
            return dict(error=str(e))
        return dict(error=None)

    # HSDP: replicate over 2 ranks, shard over 1. FSDP2 averages the grads over the
    # replicas, so MADA must sum over the (trivial) shard dimension only.
    hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    jobs = [("fsdp_f64", lambda: fsdp_mada(F64)), ("fsdp_f32", lambda: fsdp_mada(F32)),
            ("ddp", ddp_mada), ("hsdp", lambda: fsdp_mada(F64, hsdp)),
            ("dtensor", lambda: manual(False)), ("explicit_group", lambda: manual(True)),
            ("mixed", mixed_rejected), *[(f"other_{n}", lambda n=n: fsdp_other(n)) for n in OTHERS],
            *[(f"dcp_{n}", lambda n=n: dcp_resume(n)) for n in ("MADA", "AdaMod")],
            ("dcp_kahan", lambda: dcp_resume("AdaMod", BF16, kahan_sum=True)),
            ("fsdp_bf16_state", lambda: fsdp_mada(F32, **BF16_STATE)),
            *[(f"dcp_{n}_bf16_state", lambda n=n: dcp_resume(n, F32, **BF16_STATE)) for n in ("MADA", "AdaMod")],
            ("fsdp_8bit", lambda: fsdp_mada(F32, hidden=HIDDEN_Q8, **Q8)),
            ("dtensor_8bit_AdaMod", lambda: manual_q8(*OTHERS["AdaMod"])),
            ("dtensor_8bit_MADA", lambda: manual_q8(MADA, dict(MADA_KW, process_group=mesh))),
            *[(f"dcp_{n}_8bit", lambda n=n: dcp_resume(Q8_DCP[n][0], F32, HIDDEN_Q8, **Q8_DCP[n][1])) for n in Q8_DCP]]
    for name, job in jobs:
        try:
            out[name] = job()
        except BaseException:  # DCP's CheckpointException is not an Exception
            # The other rank may be waiting in a collective now: stop here.
            out[name] = dict(failed=traceback.format_exc())
            break
    return out


def _worker(rank: int, tmp: str) -> None:
    os.environ.pop("MADA_FUSED_BACKEND", None)  # as conftest does for the single-process side
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.save(_scenarios(rank, init_device_mesh("cpu", (WORLD,)), tmp), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = str(tmp_path_factory.mktemp("dist"))
    ctx = torch.multiprocessing.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 240 s")
    return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(WORLD)]


def result(ranks: list[dict], name: str) -> list[dict]:
    for r, out in enumerate(ranks):
        assert name in out, f"rank {r} never ran {name!r} (an earlier scenario failed)"
        assert "failed" not in out[name], f"rank {r}, {name}:\n{out[name]['failed']}"
    return [out[name] for out in ranks]


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err = (got.to(F64) - want.to(F64)).abs().max().item()
    scale = want.to(F64).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def single_process(dtype: torch.dtype, make_opt=lambda ps: MADA(ps, **MADA_KW)) -> tuple[torch.Tensor, list]:
    m = make_model(dtype)
    coefs = train(m, make_opt(m.parameters()), batches(dtype))
    return coefs, [p.detach() for p in m.parameters()]


def assert_same_bits_on_ranks(res: list[dict]) -> None:
    for r in range(1, WORLD):
        assert torch.equal(res[0]["coefs"], res[r]["coefs"]), "coefficients differ between ranks"


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype,rel", [(F64, 1e-10), (F32, 1e-5)], ids=["float64", "float32"])
def test_fsdp2_mada_matches_single_process(ranks, dtype, rel):
    res = result(ranks, "fsdp_f64" if dtype == F64 else "fsdp_f32")
    assert_same_bits_on_ranks(res)
    coefs, params = single_process(dtype)
    assert not torch.allclose(coefs[-1], coefs[0], rtol=0, atol=1e-3), "the coefficients should have moved"
    assert_rel(res[0]["coefs"], coefs, rel, "coefficient trajectory")
    for i, (got, want) in enumerate(zip(res[0]["params"], params)):
        assert_rel(got, want, rel, f"parameter {i}")
    assert res[0]["groups"] == 1  # one all-reduce per step, over the shard group
    layout = res[0]["layout"]
    assert layout["step"][:2] == ("Tensor", "None")
    assert layout["m"][:3] == ("DTensor", "(Shard(dim=0),)", str(dtype))
    assert layout["tangents"][:3] == ("DTensor", "(Shard(dim=1),)", str(dtype))


def test_fsdp2_mada_with_bf16_state_matches_single_process(ranks):
    """bf16 state, sharded: stored as bf16 DTensor shards (tangents fp32), the same
    coefficients on both ranks, and the single-process bf16-state run up to the
    stochastic rounding, whose draws depend on the element's index in its rank's
    buffer (docs/spec.md 5.1): as close as the fp32-state run is to it."""
    res = result(ranks, "fsdp_bf16_state")
    assert_same_bits_on_ranks(res)
    layout = res[0]["layout"]
    for k in ("m", "v", "n", "g_prev", "l", "vb", "s"):
        if k in layout:
            assert layout[k][:3] == ("DTensor", "(Shard(dim=0),)", "torch.bfloat16"), k
    assert layout["m"][2] == "torch.bfloat16" and layout["v"][2] == "torch.bfloat16"
    assert layout["tangents"][:3] == ("DTensor", "(Shard(dim=1),)", "torch.float32")
    coefs, params = single_process(F32, lambda ps: MADA(ps, **MADA_KW, **BF16_STATE))
    fp32_coefs, fp32_params = single_process(F32)
    assert not torch.allclose(coefs[-1], coefs[0], rtol=0, atol=1e-3), "the coefficients should have moved"
    assert_rel(res[0]["coefs"], coefs, 2e-3, "coefficient trajectory")
    assert_rel(res[0]["coefs"], fp32_coefs, 2e-3, "coefficient trajectory against fp32 state")
    for i, (got, want, want32) in enumerate(zip(res[0]["params"], params, fp32_params)):
        assert_rel(got, want, 2e-3, f"parameter {i}")
        assert_rel(got, want32, 2e-3, f"parameter {i} against fp32 state")


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_fsdp2_other_optimizers_match_single_process(ranks, name):
    (res, _) = result(ranks, f"other_{name}")
    cls, kw = OTHERS[name]
    _, params = single_process(F64, lambda ps: cls(ps, **kw))
    for i, (got, want) in enumerate(zip(res["params"], params)):
        assert_rel(got, want, 1e-10, f"{name} parameter {i}")


@pytest.mark.parametrize("name", ["ddp", "hsdp"])
def test_replicas_match_single_process(ranks, name):
    """DDP: no hyper-gradient all-reduce. HSDP: one over the shard dimension only."""
    res = result(ranks, name)
    assert_same_bits_on_ranks(res)
    coefs, params = single_process(F64)
    assert_rel(res[0]["coefs"], coefs, 1e-10, "coefficient trajectory")
    for r in range(WORLD):
        for i, (got, want) in enumerate(zip(res[r]["params"], params)):
            assert_rel(got, want, 1e-10, f"rank {r} parameter {i}")
    assert res[0]["groups"] == (0 if name == "ddp" else 1)


@pytest.mark.parametrize("name", ["dtensor", "explicit_group"])
def test_hand_sharded_params_match_single_process(ranks, name):
    """distribute_tensor shards (dim 0 and 1, uneven, empty), or plain shards with process_group=."""
    res = result(ranks, name)
    assert_same_bits_on_ranks(res)
    params = manual_params(F64)
    coefs = run_manual(MADA(params, **MADA_KW), params, manual_grads(F64))
    assert_rel(res[0]["coefs"], coefs, 1e-10, "coefficient trajectory")
    if name == "explicit_group":  # put the plain shards back together
        got = [torch.cat([res[r]["params"][i] for r in range(WORLD)], dim=d) for i, (_, d) in enumerate(SHAPES)]
    else:
        got = res[0]["params"]
    for i, (g, want) in enumerate(zip(got, params)):
        assert_rel(g, want.detach(), 1e-10, f"parameter {i}")


# kahan: bf16 params, kahan_comp sharded too. bf16 state: saved and loaded as bf16, and the
# stochastic rounding's seed with it (the resumed optimizer is built with the default seed).
@pytest.mark.parametrize("name,state", [("MADA", "float64"), ("AdaMod", "float64"), ("kahan", "float32"),
                                        ("MADA_bf16_state", "bfloat16"), ("AdaMod_bf16_state", "bfloat16")])
def test_dcp_save_and_resume_is_bit_exact(ranks, name, state):
    for r, res in enumerate(result(ranks, f"dcp_{name}")):
        straight, resumed = res["coefs"]
        assert torch.equal(straight, resumed), f"rank {r}: coefficients after resuming differ"
        assert res["same_params"] and res["same_state"], f"rank {r}: parameters or state differ after resuming"
        assert res["loaded"], f"rank {r}: the state loaded is not the state saved"
        assert ("kahan_comp" in res["names"]) == (name == "kahan")
        assert res["dtypes"]["m"] == f"torch.{state}"


def test_mixed_sharded_and_plain_params_are_rejected_when_learning(ranks):
    res = result(ranks, "mixed")
    assert res[0]["error"] is not None and "once per rank" in res[0]["error"]


def test_process_group_must_be_a_group_or_mesh():
    with pytest.raises(TypeError, match="ProcessGroup or a DeviceMesh"):
        MADA([torch.zeros(3, requires_grad=True)], process_group="world")


# --------------------------------------------------------------------------- #
# 8-bit state (docs/spec.md 5.4): blocks per local shard
# --------------------------------------------------------------------------- #

def _q8_twin(cls, kw) -> tuple[torch.Tensor, list, list]:
    """A single process stepping every rank's shards as parameters of their own, so with the
    same blocks: (coefficients, and per rank its shards' parameters and state)."""
    dims = [d for _, d in SHAPES_Q8]
    cut = lambda t, k: shard_of(t, dims[k % len(dims)], k // len(dims))  # noqa: E731
    params = [cut(p, k).requires_grad_() for k, p in enumerate(manual_params(F32, SHAPES_Q8) * WORLD)]
    opt = cls(params, **kw, **Q8)
    coefs = run_manual(opt, params, [row * WORLD for row in manual_grads(F32, 6, SHAPES_Q8)], cut)
    n = len(dims)
    return (coefs, [[p.detach() for p in params[r * n:(r + 1) * n]] for r in range(WORLD)],
            [[dict(opt.state[p]) for p in params[r * n:(r + 1) * n]] for r in range(WORLD)])


def test_fsdp2_8bit_state_steps_each_shard_as_its_own_parameter(ranks):
    """AdaMod works element by element: each rank's shard, its parameters, codes and scales,
    is bit for bit what a single process gets stepping that shard as a parameter."""
    res = result(ranks, "dtensor_8bit_AdaMod")
    cls, kw = OTHERS["AdaMod"]
    _, params, state = _q8_twin(cls, kw)
    for r in range(WORLD):
        for i, (got, want) in enumerate(zip(res[r]["params"], params[r])):
            assert torch.equal(got, want), f"rank {r} parameter {i}"
        for i, (got, want) in enumerate(zip(res[r]["state"], state[r])):
            assert sorted(got) == sorted(want), f"rank {r} parameter {i}: {sorted(got)} != {sorted(want)}"
            for k in want:
                assert torch.equal(got[k], want[k]), f"rank {r} parameter {i}: state {k!r} differs"
        assert res[r]["state"][0]["m"].dtype == torch.uint8 and res[r]["state"][2]["m"].dtype == F32


def test_fsdp2_mada_with_8bit_state_matches_single_process(ranks):
    """MADA couples the shards through the all-reduced hyper-gradient, summed in another
    order than a single process sums: each rank's shards against a single process stepping
    them as parameters, with a rounding's latitude (a code may round the other way); and the
    FSDP2 model, whose blocks are per shard, against a single process's (other blocks) and
    against fp32 state, as close as 8-bit state is to fp32 state."""
    res = result(ranks, "dtensor_8bit_MADA")
    assert_same_bits_on_ranks(res)
    coefs, params, _ = _q8_twin(MADA, MADA_KW)
    assert_rel(res[0]["coefs"], coefs, 1e-6, "coefficient trajectory")
    for r in range(WORLD):
        for i, (got, want) in enumerate(zip(res[r]["params"], params[r])):
            assert_rel(got, want, 1e-5, f"rank {r} parameter {i}")

    res = result(ranks, "fsdp_8bit")
    assert_same_bits_on_ranks(res)
    layout = res[0]["layout"]
    for k in ("m", "v", "n", "g_prev", "l", "vb", "s"):
        if k in layout:
            assert layout[k] == ("DTensor", "(Shard(dim=0),)", "torch.uint8", (HIDDEN_Q8, 7)), k
            # one scale per 256 elements of this rank's 301 x 7 shard, a plain tensor
            assert layout[f"{k}_scale"] == ("Tensor", "None", "torch.float32", (9,)), k
    assert res[0]["local"][0] == (301, 7) and res[1]["local"][0] == (300, 7)
    # 8-bit by the parameter's global size, on every rank; the small ones fp32
    for r in range(WORLD):
        assert res[r]["state_dtypes"] == ["torch.uint8"] + ["torch.float32"] * 3, r
    runs = {}
    for name, storage in (("8bit", Q8), ("fp32", {})):
        m = make_model(F32, HIDDEN_Q8)
        runs[name] = train(m, MADA(m.parameters(), **MADA_KW, **storage), batches(F32)), list(m.parameters())
    (coefs, params), (fp32_coefs, fp32_params) = runs["8bit"], runs["fp32"]
    assert not torch.allclose(coefs[-1], coefs[0], rtol=0, atol=1e-3), "the coefficients should have moved"

    def err(a, b):
        return (a.detach().double() - b.detach().double()).abs().max().item()

    # Learned coefficients make this run chaotic: 8-bit state ends 0.09 from fp32 state on
    # parameters that moved 0.8, and the sharded run (other blocks) 0.02 from the single one.
    assert err(res[0]["coefs"], coefs) <= err(coefs, fp32_coefs), "coefficient trajectory"
    for i, (got, want, want32) in enumerate(zip(res[0]["params"], params, fp32_params)):
        assert err(got, want) <= max(err(want, want32), 1e-6), f"parameter {i}"


@pytest.mark.parametrize("name", sorted(Q8_DCP))
def test_dcp_8bit_state_resumes_bit_exact_and_reloads_per_rank(ranks, name):
    """DCP saves 8-bit state (and tangent rows) decoded, as bf16 DTensors; loading encodes
    it again into the same codes and scales on the same world size. A rank's own state_dict
    (codes as DTensors, its scales plain) loads back on that rank."""
    for r, res in enumerate(result(ranks, f"dcp_{name}_8bit")):
        straight, resumed = res["coefs"]
        assert torch.equal(straight, resumed), f"rank {r}: coefficients after resuming differ"
        assert res["same_params"] and res["same_state"], f"rank {r}: parameters or state differ after resuming"
        assert res["loaded"], f"rank {r}: the state loaded is not the state saved"
        assert res["plain_reload"], f"rank {r}: a rank's state_dict did not load back the same"
        assert res["dtypes"]["m"] == "torch.uint8" and res["dtypes"]["m_scale"] == "torch.float32"
        saved = res["saved"]["0.weight"]
        assert "m_scale" not in saved and saved["m"].dtype == BF16 and saved["m"].shape == (HIDDEN_Q8, 7)
        assert res["saved"]["0.bias"]["m"].dtype == F32
        if name == "MADA_tangents":
            assert res["dtypes"]["tangents"] == "torch.uint8" and res["dtypes"]["tangents_scale"] == "torch.float32"
            assert "tangents_scale" not in saved and saved["tangents"].dtype == BF16
            assert res["saved"]["0.bias"]["tangents"].dtype == F32


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process: as meant
@pytest.mark.parametrize("name", sorted(Q8_DCP))
def test_dcp_8bit_state_saved_on_two_ranks_loads_on_one(ranks, name):
    """Other blocks: the one process encodes the saved values with its own (bit for bit
    quant8's encoding of the whole decoded buffer, or row), and trains on as the two ranks
    did, within 8-bit state's latitude."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from mada_fused import distributed as md
    from mada_fused.quant8 import encode_entry

    res = result(ranks, f"dcp_{name}_8bit")[0]
    base, storage = Q8_DCP[name]
    cls, kw = (MADA, MADA_KW) if base == "MADA" else OTHERS[base]
    m = make_model(F32, HIDDEN_Q8)
    opt = cls(m.parameters(), **kw, **storage)
    sd = {"model": get_model_state_dict(m), "optim": md.get_optimizer_state_dict(m, opt)}
    dcp.load(sd, checkpoint_id=res["where"])
    set_model_state_dict(m, sd["model"])
    md.set_optimizer_state_dict(m, opt, sd["optim"])
    for (fqn, p) in m.named_parameters():
        assert torch.equal(p.detach(), res["saved_params"][fqn]), fqn
        saved, st = res["saved"][fqn], opt.state[p]
        assert torch.equal(st["step"], saved["step"])
        for k, v in saved.items():
            if k == "step":
                continue
            if v.dtype == BF16:
                codes, scale = encode_entry(k, v.float())
                assert torch.equal(st[k].reshape(codes.shape), codes) and torch.equal(st[f"{k}_scale"], scale), (fqn, k)
            else:
                assert torch.equal(st[k], v), (fqn, k)
    assert st["m"].dtype == F32 and opt.state[m[0].weight]["m"].dtype == torch.uint8  # the last is small
    if name == "MADA_tangents":
        assert opt.state[m[0].weight]["tangents"].dtype == torch.uint8
    train(m, opt, batches(F32)[5:])
    for i, (got, want) in enumerate(zip(m.parameters(), res["straight_params"])):
        assert_rel(got.detach(), want, 5e-3, f"parameter {i} after training on")
