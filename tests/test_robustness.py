"""Wrong or unusual use on every present backend (the probes are in
robustness_probes.py; docs/robustness.md says what each pins).

The probes run in child processes, one per backend, side by side: a probe
that crashes or hangs its process fails here instead of taking pytest down,
and the remaining probes run on in a new child. Triton runs under its
interpreter (TRITON_INTERPRET=1) when it imports.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import robustness_probes as rp  # tests/, on sys.path through conftest
from mada_fused import backends

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 240  # per child: a hang shows as the probe that started last


def _present() -> list[str]:
    out = ["reference"]
    for name in ("cpu", "triton"):
        try:
            backends.load(name)
        except backends.BackendUnavailable:
            continue
        out.append(name)
    return out


BACKENDS = _present()


def _spawn(backend: str, names: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")])))
    env.pop("MADA_FUSED_BACKEND", None)
    env.pop("MADA_TRITON_CONFIG", None)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    return subprocess.Popen([sys.executable, os.path.join(HERE, "robustness_probes.py"), backend, *names],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _read(backend: str, proc: subprocess.Popen, deadline: float, results: dict) -> None:
    """Record each probe's outcome from the child's output; a probe that started
    and never ended is the one that crashed or hung the child."""
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        how = f"died (exit code {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        how = f"hung (killed after {TIMEOUT_S} s)"
    started = None
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "START":
            started = rest
        elif kind in ("PASS", "FAIL") and started is not None:
            results[backend, started] = None if kind == "PASS" else rest
            started = None
    if started is not None:
        results[backend, started] = f"the process {how} in this probe; its output ended with:\n{out[-3000:]}"
    elif proc.returncode:
        raise RuntimeError(f"the {backend} probes failed to run:\n{out[-3000:]}")


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """{(backend, probe): None when it passed, else why not}."""
    results: dict = {}
    pending = {b: list(rp.PROBES) for b in BACKENDS}
    while pending:
        deadline = time.monotonic() + TIMEOUT_S
        children = {b: _spawn(b, names) for b, names in pending.items()}
        for b, proc in children.items():
            _read(b, proc, deadline, results)
        pending = {b: rest for b, names in pending.items() if (rest := [n for n in names if (b, n) not in results])}
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(rp.PROBES))
def test_probe(outcomes, backend, name):
    why = outcomes[backend, name]
    assert why is None, f"{backend}: {name}: {why}"
