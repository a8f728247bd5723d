"""The path of one V2PE batch through the code, measured: from the YAML file to the loss.

    .venv/bin/python tools/batch_path.py [configs/v2pe-demo.yaml]

In one process (a one-rank gloo world, no Ray: the driver's and Ray's part of
`longview train` is listed in docs/architecture.md), it loads the config, prepares the
data, builds the workload's runner and trains one micro-step, recording every call
into the project's own files (every module is imported first, so imports are not
counted). It prints the files in the order the batch first reaches them, how many
there are, the distinct calls between two files (caller file -> callee file), and how
many of those go back: into a file the batch reached before the caller's.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "workloads", "parallelism")


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    from orchestrator.config import load_config
    from parallelism.local_world import free_port
    from workloads.spec import RunContext

    config = argv[0] if argv else "configs/v2pe-demo.yaml"
    for package in PACKAGES:  # imports are not the batch's path
        for f in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if not module.endswith(("ring_demo", "demo")):
                importlib.import_module(module)
    first: dict[str, int] = {}  # file -> order of first call
    edges: set[tuple[str, str]] = set()
    segments: list[tuple[str, dict, set]] = []

    def ours(frame) -> str | None:
        f = frame.f_code.co_filename if frame is not None else ""
        rel = os.path.relpath(f, ROOT) if f.startswith(str(ROOT)) else ""
        return rel if rel.split(os.sep)[0] in PACKAGES else None

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = ours(frame)
        if callee is None:
            return
        first.setdefault(callee, len(first))
        caller = frame.f_back
        while caller is not None and ours(caller) is None:  # through torch and the standard library
            caller = caller.f_back
        if caller is not None and ours(caller) != callee:
            edges.add((ours(caller), callee))

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"storage.uri": tmp, "resources.workers": 1, "parallelism.cp": 1, "tracking.uri": None}
        sys.setprofile(profile)
        try:
            cfg = load_config(config, overrides=overrides)
            root = os.path.join(tmp, cfg.name)
            cfg.spec.prepare_data(cfg, root)
            import torch

            runner = cfg.spec.build_runner(cfg, RunContext(rank=0, world_size=1, device=torch.device("cpu"),
                                                           run_root=root))
            segments.append(("start: YAML to a built runner", dict(first), set(edges)))
            first.clear()
            edges.clear()
            result = runner.step(0)
            segments.append(("step: one batch to its loss", dict(first), set(edges)))
        finally:
            sys.setprofile(None)
    dist.destroy_process_group()
    for title, first, edges in segments:
        back = sorted((a, b) for a, b in edges if first[b] < first[a])
        print(f"{title}:")
        for f, i in first.items():
            print(f"{i + 1:5d}  {f}")
        print("  back:", *(f"{a} -> {b}" for a, b in back), sep="\n    ")
        print(f"  {len(first)} files, {len(edges)} distinct calls between files, {len(back)} of them back to a "
              "file reached earlier")
    print(f"loss {result.loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
