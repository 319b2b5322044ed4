"""The step benchmark's bookkeeping: GB/s and "% of the byte floor" in
bench/RESULTS.md are only as right as the byte counts and the round summary."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
step = pytest.importorskip("bench.step", reason="bench/ is not importable (installed wheel without the checkout)")


@pytest.mark.parametrize("name", sorted(step.CONFIGS))
def test_state_buffers_match_what_the_optimizer_allocates(name):
    cfg = step.CONFIGS[name]
    params = [torch.zeros(5, requires_grad=True)]
    params[0].grad = torch.ones(5)
    opt = step.make_optimizer(cfg, "torch_fused" if cfg.cls == "AdamW" else "reference", params)
    opt.step()
    st = opt.state[params[0]]
    # Every per-element tensor in the state is one buffer; tangents hold one row per learned coefficient.
    n = sum(len(t) if k == "tangents" else 1 for k, t in st.items() if k != "step" and t.numel() > 1)
    assert step.state_buffers(cfg) == n


def test_rounds_interleave_and_summarize(monkeypatch):
    calls = []

    def fake_run_case(cfg, backend, params, device, quick):
        calls.append((cfg.name, backend))
        return [0.001 * len(calls), 0.003 * len(calls)]

    def fake_run_floor(numel, n_state, quick):
        calls.append(("floor", n_state))
        return [0.0005 * len(calls)]

    monkeypatch.setattr(step, "run_case", fake_run_case)
    monkeypatch.setattr(step, "run_floor", fake_run_floor)
    monkeypatch.setattr(step, "copy_bandwidth", lambda *a: {"gbps": 10.0, "gbps_min_time": 20.0})
    rows, _ = step.run_benchmark("cpu", [1024], ["flat"], ["adam_corner"], ["reference", "cpu"], torch.float32,
                                 quick=True, rounds=3)
    per_round = [("floor", 2), ("adamw", "torch_fused"), ("adamw", "torch_foreach"), ("adam_corner", "cpu")]
    # Interleaved, every case once per round, each stream mix's floor (all three move 2 state
    # buffers) once per round before its first case; the reference once, after all rounds.
    assert calls == per_round * 3 + [("adam_corner", "reference")]
    corner = next(r for r in rows if r["config"] == "adam_corner" and r["backend"] == "cpu")
    # Rounds 1..3 of this case were calls 4, 8, 12: medians 2 * 0.004, 2 * 0.008, 2 * 0.012 s,
    # against floors from calls 1, 5, 9 (0.5, 2.5, 4.5 ms).
    assert corner["round_ms"] == pytest.approx([8.0, 16.0, 24.0])
    assert corner["time_ms"] == pytest.approx(16.0) and corner["time_min_ms"] == pytest.approx(4.0)
    assert corner["x_floor"] == pytest.approx(sorted([8 / 0.5, 16 / 2.5, 24 / 4.5])[1])
    assert corner["floor_ms"] == pytest.approx(2.5)
    fused = next(r for r in rows if r["backend"] == "torch_fused")
    assert fused["time_ms"] == pytest.approx(12.0) and corner["ratio_torch_fused"] == pytest.approx(16.0 / 12.0)
    assert corner["bytes"] == 1024 * (3 * 4 + 2 * 4 * 2)
    reference = next(r for r in rows if r["backend"] == "reference")
    assert reference["round_ms"] == pytest.approx([26.0])  # call 13, paired with round 3's floor
    assert reference["x_floor"] == pytest.approx(26.0 / 4.5)


def test_no_floor_off_the_cpu_or_fp32(monkeypatch):
    monkeypatch.setattr(step, "run_case", lambda *a: [0.001])
    monkeypatch.setattr(step, "run_floor", lambda *a: pytest.fail("the floor only moves fp32 on the CPU"))
    monkeypatch.setattr(step, "copy_bandwidth", lambda *a: {"gbps": 10.0, "gbps_min_time": 20.0})
    rows, _ = step.run_benchmark("cpu", [1024], ["flat"], [], [], torch.bfloat16, quick=True)
    assert all(r["x_floor"] is None for r in rows)


def test_floor_sweep_moves_every_stream():
    """The floor is a real pass: every in-place stream is read and written, every
    read-only one read and left alone, over all elements (odd count, several chunks)."""
    floor = pytest.importorskip("bench.floor")
    pytest.importorskip("mada_fused.flat_state")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build bench/stream_floor.cpp")
    lib, why = floor.library()
    assert lib is not None, why
    n = (1 << 17) + 13
    sweep = floor.sweep_fn(n, 3, 2)
    rw, ro = sweep.streams[:3], sweep.streams[3:]
    for k, s in enumerate(rw):
        s.fill_(float(k))
    ro[0].fill_(2.0)
    ro[1].fill_(5.0)
    sweep()
    for k, s in enumerate(rw):  # x <- 0.999 x + 1e-3 * (sum of the read-only streams)
        torch.testing.assert_close(s, torch.full((n,), 0.999 * k + 7e-3), rtol=1e-6, atol=1e-7)
    assert bool((ro[0] == 2.0).all()) and bool((ro[1] == 5.0).all())
    assert len({s.data_ptr() % 4096 for s in sweep.streams}) == 5  # placed like optimizer state


def test_slow_cases_run_once(monkeypatch):
    calls = []
    monkeypatch.setattr(step, "run_case", lambda cfg, b, *a: calls.append(b) or [2 * step.SLOW_S])
    monkeypatch.setattr(step, "copy_bandwidth", lambda *a: {"gbps": 10.0, "gbps_min_time": 20.0})
    step.run_benchmark("cpu", [1024], ["flat"], [], [], torch.float32, quick=True, rounds=4)
    assert calls == ["torch_fused", "torch_foreach"]


def test_ab_ext_steps_two_separately_loaded_builds(tmp_path, capsys):
    """bench/ab_ext.py is only worth its numbers if the two builds really are two modules."""
    ext = pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")
    ab = pytest.importorskip("bench.ab_ext")
    a, b = ab.load_build(ext.__file__, tmp_path, "0"), ab.load_build(ext.__file__, tmp_path, "1")
    assert a is not b and a.__file__ != b.__file__ and a.run is not b.run
    assert ab.main([ext.__file__, ext.__file__, "--size", "4K", "--config", "adam_corner",
                    "--rounds", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "adam_corner, 4096 fp32 elements" in out and "second / first:" in out


def test_paired_reports_b_over_a_in_both_allocation_orders(monkeypatch, capsys):
    paired = pytest.importorskip("bench.paired")
    seconds = {"adam_corner": 1.0, "adamw": 2.0}
    orders = []

    def fake_measure(cases, floor_of, numel, pairs, warmup):
        orders.append([c for c, *_ in cases])
        return [[seconds[c]] * pairs for c, *_ in cases] + [[0.5] * pairs]

    monkeypatch.setattr(paired, "measure", fake_measure)
    assert paired.main(["adam_corner:cpu", "adamw:torch_fused", "--pairs", "3"]) == 0
    out = capsys.readouterr().out
    assert orders == [["adam_corner", "adamw"], ["adamw", "adam_corner"]]
    assert out.count("adamw:torch_fused / adam_corner:cpu per pair: median 2.000") == 2
    assert out.count("adam_corner:cpu / floor per pair: median 2.000") == 2
    assert "geometric mean of the two orders: 2.000" in out


def test_paired_runs_and_rejects_bad_cases(capsys):
    pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")
    paired = pytest.importorskip("bench.paired")
    for bad in ("adamw:cpu", "adam_corner:torch_fused", "nope:cpu", "adam_corner", "adam_corner:cuda",
                "adam_corner:nope", "adamw:torch_fused:bf16", "adam_corner:cpu:fp16", "adamod:cpu:bf16:bf16",
                "mada_full:cpu:bf16:bf16:bf16"):
        with pytest.raises(SystemExit):
            paired.main([bad, "adamw:torch_fused"])
    assert paired.main(["adam_corner:cpu", "adamw:torch_fused", "--size", "4K", "--pairs", "3",
                        "--warmup", "1"]) == 0
    assert "geometric mean of the two orders" in capsys.readouterr().out


def test_paired_times_a_state_dtype_against_fp32():
    """``config:backend:bf16`` builds the optimizer with bf16 state, and the two cases
    step their own parameters from the same start."""
    pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")
    paired = pytest.importorskip("bench.paired")
    assert paired.parse_case("mada_full:cpu:bf16") == ("mada_full", "cpu", "bf16", "fp32")
    assert paired.parse_case("mada_full:cpu") == ("mada_full", "cpu", "fp32", "fp32")
    assert paired.parse_case("mada_full:cpu:fp32:bf16") == ("mada_full", "cpu", "fp32", "bf16")
    assert paired.case_name("mada_full", "cpu", "fp32", "bf16") == "mada_full:cpu:fp32:bf16"
    assert paired.case_name("mada_full", "cpu", "bf16", "fp32") == "mada_full:cpu:bf16"
    cfg = paired.case_config("mada_full", "bf16")
    assert cfg.kwargs["state_dtype"] == torch.bfloat16 and "state_dtype" not in step.CONFIGS["mada_full"].kwargs
    assert "tangent_dtype" not in cfg.kwargs and "state_dtype" not in paired.case_config("mada_full").kwargs
    both = paired.case_config("mada_full", "8bit", "bf16").kwargs
    assert both["state_dtype"] == "8bit" and both["tangent_dtype"] == torch.bfloat16
    init, grad = torch.randn(4096), torch.randn(4096)
    opts = [step.one_param_optimizer(paired.case_config("mada_full", d), "cpu", init, grad) for d in ("fp32", "bf16")]
    for o in opts:
        o.step()
    (p32,), (p16,) = (o.param_groups[0]["params"] for o in opts)
    assert [o.state[p]["v"].dtype for o, p in zip(opts, (p32, p16))] == [torch.float32, torch.bfloat16]
    assert p32 is not p16 and torch.allclose(p32, p16, rtol=0, atol=1e-5) and not torch.equal(p32, init)


def test_memory_counts_each_optimizers_state_bytes(capsys):
    """bench.memory's bytes/param against counts worked out from docs/spec.md section 1.4
    (which buffers each configuration allocates) and the state dtype; sizes here are
    multiples of 16 bytes, so no alignment padding enters the per-element count."""
    memory = pytest.importorskip("bench.memory")
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    rows = memory.rows_for(("adamod", "mada_full"), layers=2, width=64, batch=4, device=torch.device("cpu"))
    got = {(r["config"], r["state_dtype"], r["tangents"]): r for r in rows}
    # AdamW: m, v fp32. AdaMod: m, v, s. Full MADA: m, v, n, g', l, vb at the state
    # dtype and six tangent rows at the tangent dtype (docs/spec.md 5.3). 8-bit (5.4): each
    # 64 x 64 weight's buffers 1 byte per element plus an fp32 scale per 256; the 64-element
    # biases keep fp32 state (under 4,096 elements).
    n = 2 * (64 * 64 + 64)
    q8 = 2 * (64 * 64 + 4 * 16)
    expected = {("adamw", "fp32", "-"): 8, ("adamod", "fp32", "-"): 12, ("adamod", "bf16", "-"): 6,
                ("adamod", "8bit", "-"): (3 * q8 + 3 * 4 * 128) / n,
                ("mada_full", "fp32", "fp32"): 48, ("mada_full", "fp32", "bf16"): 6 * 4 + 6 * 2,
                ("mada_full", "bf16", "fp32"): 6 * 2 + 6 * 4, ("mada_full", "bf16", "bf16"): 24,
                ("mada_full", "8bit", "fp32"): (6 * q8 + 6 * 4 * 128 + 6 * 4 * n) / n,
                ("mada_full", "8bit", "bf16"): (6 * q8 + 6 * 4 * 128 + 6 * 2 * n) / n,
                ("mada_full", "8bit", "8bit"): (12 * q8 + 12 * 4 * 128) / n}  # 8-bit rows too (5.5)
    assert {k: r["state_per_param"] for k, r in got.items()} == pytest.approx(expected, rel=1e-12)
    for r in rows:
        assert r["params"] == n
        # The real allocations hold at least the state (ours add page padding per buffer,
        # AdamW its step counters; 8-bit state two buckets, small parameters' fp32 one beside),
        # and during the step the parameters and the state are live.
        buckets = 2 if r["state_dtype"] == "8bit" else 1
        assert r["state_bytes"] <= r["allocated_bytes"] <= r["state_bytes"] + buckets * 16 * 4096
        assert r["peak_bytes"] >= 4 * n + r["state_bytes"]
    assert got["adamw", "fp32", "-"]["peak_over_adamw_bytes"] == 0
    memory.main(["--quick", "--configs", "adamod"])
    out = capsys.readouterr().out
    assert "| adamod | bf16 | - |" in out and "| adamw | fp32 | - |" in out
    with pytest.raises(SystemExit):
        memory.main(["--configs", "nope"])


def _agg(mean: float, sd: float, seeds: list[float]) -> dict:
    return dict(final_val=mean, final_val_sd=sd, final_val_seeds=seeds, n_seeds=len(seeds), time_s=1.0, cpu_s=0.5)


def test_lowprec_rows_skip_what_the_build_lacks_and_judge_against_fp32():
    lowprec = pytest.importorskip("bench.lowprec")

    class Stepper:
        def step(self):
            pass

    def make_for(opt):
        def make(params, **kw):  # a build without Kahan summation
            assert params[0].numel() >= 4096  # above 8-bit state's fp32 threshold
            if "kahan_sum" in kw:
                raise TypeError("MADA() got an unexpected keyword argument 'kahan_sum'")
            return Stepper()
        return make

    run, skipped = lowprec.rows(["AdamW", "AdamW-corner", "MADA"], ["fp32", "bf16-state+tangents",
                                                                     "bf16-params+kahan"], make_for)
    # torch's AdamW: the fp32 anchor only; bf16 tangents: MADA only (nothing else learns).
    assert run == [("AdamW", "fp32"), ("AdamW-corner", "fp32"), ("MADA", "fp32"), ("MADA", "bf16-state+tangents")]
    assert [(o, v) for o, v, _ in skipped] == [("AdamW-corner", "bf16-params+kahan"), ("MADA", "bf16-params+kahan")]
    assert "kahan_sum" in skipped[0][2] and skipped[0][2].startswith("TypeError")
    with pytest.raises(ValueError, match="nope"):
        lowprec.rows(["MADA"], ["nope"], make_for)
    # fp32 row 1.0 +- 0.1: bf16 0.5 sd off (target 1), 8-bit 2.5 sd off (target 2).
    by_row = {("AdamW", "fp32"): _agg(1.01, 0.1, [1.01, 1.01]), ("AdamW-corner", "fp32"): _agg(1.0, 0.1, [0.9, 1.1]),
              ("AdamW-corner", "bf16-state"): _agg(1.05, 0.1, [0.95, 1.15]),
              ("AdamW-corner", "8bit-state"): _agg(1.25, 0.1, [1.0, 1.5])}
    md = "\n".join(lowprec.markdown({"digits": by_row}, {"digits": 20}, skipped))
    assert ("| AdamW-corner | bf16-state | float32 | 1.0500 +- 0.1000 | +0.0500 | +0.50 | +0.0500 (0/2) "
            "| meets (<= 1 sd) | 1.0 (0.5) |") in md
    assert "| 8bit-state | float32 | 1.2500 +- 0.1000 | +0.2500 | +2.50 | +0.2500 (0/2) | misses (<= 2 sd) |" in md
    assert "| AdamW | fp32 | float32 | 1.0100 +- 0.1000 | +0.0100 | +0.10 |" in md  # against the corner
    assert "MADA bf16-params+kahan (TypeError" in md


def test_lowprec_trains_a_tiny_digits_run(tmp_path, capsys):
    """The experiment end to end on digits, 20 steps, 2 seeds: torch's AdamW and the
    MADA corner (nothing learned) are the same optimizer, so their losses agree to
    rounding; bf16 state moves the loss a little, and not at all for a different reason."""
    pytest.importorskip("mada_fused._C_cpu", reason="the C++ CPU extension is not built")
    pytest.importorskip("sklearn")
    train = pytest.importorskip("bench.train")
    out = tmp_path / "out"
    assert train.main(["--experiments", "lowprec", "--tasks", "digits", "--scale", "0.01", "--seeds", "2",
                       "--jobs", "1", "--lowprec-optims", "AdamW,AdamW-corner,MADA",
                       "--lowprec-variants", "fp32,bf16-state,bf16-params", "--out", str(out)]) == 0
    import json

    res = json.loads((out / "results.json").read_text())["results"]["lowprec"]["digits"]
    assert set(res) == {"AdamW|fp32", "AdamW-corner|fp32", "AdamW-corner|bf16-state", "AdamW-corner|bf16-params",
                        "MADA|fp32", "MADA|bf16-state", "MADA|bf16-params"}
    torch_adamw, corner = res["AdamW|fp32"]["final_val_seeds"], res["AdamW-corner|fp32"]["final_val_seeds"]
    assert torch_adamw == pytest.approx(corner, rel=1e-4) and torch_adamw[0] != torch_adamw[1]
    for row, r in res.items():
        assert not r["diverged"] and len(r["final_val_seeds"]) == 2, row
        fp32 = res[row.split("|")[0] + "|fp32"]["final_val_seeds"]
        assert r["final_val_seeds"] == pytest.approx(fp32, rel=0.05), row
    assert res["AdamW-corner|bf16-params"]["final_val_seeds"] != corner  # really bf16 parameters
    md = (out / "results.md").read_text()
    assert "## digits: storage precision, 20 steps, 2 seed(s)" in md and "| MADA | bf16-state | float32 |" in md
