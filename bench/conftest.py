"""pytest plumbing for the step benchmarks (bench_*.py).

The benchmark files are named bench_*.py, not test_*.py, so `pytest tests` (or
any run that does not enter bench/) never collects them; this conftest collects
them when pytest is pointed at bench/. They run only with --benchmark-only (or
--benchmark-enable), and skip cleanly when pytest-benchmark, mada_fused or a
backend is missing.
"""
from __future__ import annotations

import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _opt(config, name: str) -> bool:
    try:
        return bool(config.getoption(name))
    except ValueError:  # option unknown: pytest-benchmark is not installed
        return False


def pytest_collection_modifyitems(config, items):
    if _opt(config, "benchmark_only") or _opt(config, "benchmark_enable"):
        return
    skip = pytest.mark.skip(reason="step benchmarks run with: pytest bench/ --benchmark-only")
    for item in items:
        if item.path.name.startswith("bench_"):
            item.add_marker(skip)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # give the tests a fixture that skips instead of a missing-fixture error

    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed")
