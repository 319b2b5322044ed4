"""The step benchmark's bookkeeping: GB/s and "% of the byte floor" in
bench/RESULTS.md are only as right as the byte counts and the round summary."""
from __future__ import annotations

import os
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

    monkeypatch.setattr(step, "run_case", fake_run_case)
    monkeypatch.setattr(step, "copy_bandwidth", lambda *a: {"gbps": 10.0, "gbps_min_time": 20.0})
    rows, _ = step.run_benchmark("cpu", [1024], ["flat"], ["adam_corner"], ["reference", "cpu"], torch.float32,
                                 quick=True, rounds=3)
    per_round = [("adamw", "torch_fused"), ("adamw", "torch_foreach"), ("adam_corner", "cpu")]
    # Interleaved, every case once per round; the reference once, after all rounds.
    assert calls == per_round * 3 + [("adam_corner", "reference")]
    corner = next(r for r in rows if r["config"] == "adam_corner" and r["backend"] == "cpu")
    # Rounds 1..3 of this case were calls 3, 6, 9: medians 2 * 0.003, 2 * 0.006, 2 * 0.009 s.
    assert corner["round_ms"] == pytest.approx([6.0, 12.0, 18.0])
    assert corner["time_ms"] == pytest.approx(12.0) and corner["time_min_ms"] == pytest.approx(3.0)
    fused = next(r for r in rows if r["backend"] == "torch_fused")
    assert corner["ratio_torch_fused"] == pytest.approx(12.0 / fused["time_ms"])
    assert corner["bytes"] == 1024 * (3 * 4 + 2 * 4 * 2)
    assert next(r for r in rows if r["backend"] == "reference")["round_ms"] == pytest.approx([20.0])


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
    assert a is not b and a.__file__ != b.__file__ and a.mada is not b.mada
    assert ab.main([ext.__file__, ext.__file__, "--size", "4K", "--config", "adam_corner",
                    "--rounds", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "adam_corner, 4096 fp32 elements" in out and "second / first:" in out
