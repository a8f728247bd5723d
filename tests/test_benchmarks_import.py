"""Every benchmark script imports with the code it measures: a rename in the library
cannot leave a benchmark behind unnoticed (they run only on request, some only on GPUs)."""

import importlib
import pathlib

import pytest

SCRIPTS = sorted(p.stem for p in pathlib.Path("benchmarks").glob("*.py") if not p.stem.startswith("_"))  # _measure: a helper


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert hasattr(module, "main"), f"benchmarks/{name}.py has no main()"
