"""The registry of workloads: `register` (a workload's own spec module calls it), `get`,
`names`, `commands`, and `lazy` targets that import a workload's code only when called.

Workloads outside this package register themselves when imported: list their modules in
`LONGVIEW_WORKLOADS` (comma-separated; the variable travels to the Ray workers) or in the
`longview.workloads` entry-point group of an installed package.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

from .spec import Command, WorkloadSpec

WORKLOADS_ENV = "LONGVIEW_WORKLOADS"


def commands() -> list[Command]:
    """Every registered workload's subcommands."""
    _load_plugins()
    return [c for spec in _REGISTRY.values() for c in spec.commands]


def lazy(target: str) -> Callable:
    """"package.module:name", imported when first called and then called with the same
    arguments: a spec registers without importing its model, data or planner."""
    module, name = target.split(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    return call


_REGISTRY: dict[str, WorkloadSpec] = {}
BUILTIN = ("workloads.v2pe.spec", "workloads.piip.spec")


def register(spec: WorkloadSpec) -> WorkloadSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"workload {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


@functools.cache
def _load_plugins() -> None:
    for module in BUILTIN:
        importlib.import_module(module)
    for module in filter(None, (m.strip() for m in os.environ.get(WORKLOADS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{WORKLOADS_ENV}: cannot import workload module {module!r} ({e})") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group="longview.workloads"):
        ep.load()


def get(name: str) -> WorkloadSpec:
    _load_plugins()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]


def names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)
