"""The time a failure costs: a long CPU demo run on real local services (rclone S3, MLflow,
a Ray head), with a fault injected from outside every `--every` seconds, and what each
recovery took.

    python -m benchmarks.soak --kill worker --every 120 --minutes 12
    python -m benchmarks.soak --kill s3 --every 120 --minutes 12

--kill worker: SIGKILL to one Ray Train worker process of the run (a descendant of this
benchmark's own Ray head); the driver restarts the group from the last checkpoint.
--kill s3: SIGKILL to the S3 endpoint, started again on its address `--s3-down` seconds
later (a crash its supervisor restarts); the workers ride it out within their retry window.

Per recovery: detection (the kill to the driver's "attempt N failed" line), restart and
restore (that line to the workers' "resumed from ... at step S"), the first step after
it, and the steps recomputed (the last step done before the kill minus S). The effective
training time ratio is the time the kept steps took at the run's undisturbed step time
over the wall time: (steps kept x mean undisturbed step time) / wall. With the mean time a failure
costs, L (measured here), the ratio at one failure per T minutes is T / (T + L): the
figures README gives for 10 and 30 minutes come from the measured L, and the ratio of
the run itself (its own interval) is printed beside them for comparison.

Writes JSON (`--out`) and prints a markdown table. Not part of `make test`: it runs for
`--minutes`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

STEP = re.compile(r"\[longview\] step (\d+)/\d+ ")
FAILED = re.compile(r"attempt (\d+) of \S+ failed")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descends(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid and pid != 1 and seen < 64:
        if pid == ancestor:
            return True
        pid, seen = _ppid(pid) or 0, seen + 1
    return False


def train_workers(head_pid: int) -> list[int]:
    """The Ray Train worker processes under this benchmark's head."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd and _descends(int(d.name), head_pid):
            out.append(int(d.name))
    return out


class Run:
    """The driver's output, read as it comes, with the time of every line that matters."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.t0 = proc, time.monotonic()
        self.steps: list[tuple[float, int]] = []  # (time, step)
        self.failures: list[float] = []
        self.resumes: list[tuple[float, int]] = []
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            now = time.monotonic()
            self.lines.append(line)
            if m := STEP.search(line):
                self.steps.append((now, int(m.group(1))))
            elif FAILED.search(line):
                self.failures.append(now)
            elif m := RESUMED.search(line):
                self.resumes.append((now, int(m.group(1))))

    def last_step(self) -> int:
        return self.steps[-1][1] if self.steps else 0


def recoveries(kills: list[float], run: Run) -> list[dict]:
    """Each kill matched with the failure line, resume and first step that followed it."""
    out = []
    for i, k in enumerate(kills):
        until = kills[i + 1] if i + 1 < len(kills) else float("inf")
        before = [s for t, s in run.steps if t <= k]
        failed = next((t for t in run.failures if k <= t < until), None)
        resumed = next(((t, s) for t, s in run.resumes if k <= t < until), None)
        row = {"kill_s": round(k - run.t0, 1), "last_step_before": before[-1] if before else 0}
        if failed is None or resumed is None:  # ridden out: no restart (an S3 blip within the retry window)
            first = next(((t, s) for t, s in run.steps if t > k), None)
            row.update(restarted=False, steps_recomputed=0,
                       stall_s=round(first[0] - k, 1) if first else None)
        else:
            first = next((t for t, s in run.steps if t > resumed[0]), None)
            row.update(restarted=True, detect_s=round(failed - k, 1), restart_restore_s=round(resumed[0] - failed, 1),
                       first_step_s=round(first - resumed[0], 1) if first else None,
                       resumed_at=resumed[1], steps_recomputed=max(0, row["last_step_before"] - resumed[1]))
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill", choices=["worker", "s3"], default="worker")
    ap.add_argument("--every", type=float, default=120.0, help="seconds between faults")
    ap.add_argument("--minutes", type=float, default=12.0, help="length of the run")
    ap.add_argument("--s3-down", type=float, default=5.0, help="--kill s3: seconds until the endpoint is back")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="training.checkpoint_every (steps)")
    ap.add_argument("--out", default="soak.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from orchestrator.services import LocalServices

    home = Path(tempfile.mkdtemp(prefix="lv-soak-"))
    svc = LocalServices(home)
    started = svc.up(ray_cpus=2, bucket="soak")
    env = dict(os.environ, LONGVIEW_HOME=str(home), **svc.env())
    name = f"soak-{args.kill}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "configs/v2pe-demo.yaml", "--set", f"name={name}",
           "--set", "storage.uri=s3://soak/runs", "--set", "training.steps=1000000",
           "--set", f"training.checkpoint_every={args.checkpoint_every}", "--set", "training.max_failures=1000",
           "--set", "data.synthetic.samples=4", "--set", "data.max_tokens=1024"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = Run(proc)
    rng = random.Random(args.seed)
    kills: list[float] = []
    end = run.t0 + args.minutes * 60
    try:
        while not run.steps and proc.poll() is None:  # the first step: the run is going
            time.sleep(0.5)
        start = time.monotonic()
        next_kill = start + args.every
        # No fault in the last minute: its recovery would not be seen before the end.
        last_fault = end - max(60.0, args.every / 2)
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() < next_kill or time.monotonic() > last_fault:
                continue
            if args.kill == "worker":
                workers = train_workers(started["ray"].pid)
                if not workers:
                    next_kill = time.monotonic() + 5  # between a failure and its restart: try again soon
                    continue
                victim = rng.choice(workers)
                kills.append(time.monotonic())
                os.kill(victim, signal.SIGKILL)
            else:
                s3 = svc.read()["s3"]
                kills.append(time.monotonic())
                os.kill(s3.pid, signal.SIGKILL)
                os.waitpid(s3.pid, 0)
                time.sleep(args.s3_down)
                svc.up(ray_cpus=2, bucket="soak")  # the endpoint only, on its address
            next_kill = kills[-1] + args.every
        wall = time.monotonic() - start
        proc.send_signal(signal.SIGTERM)  # `longview stop`'s way: the run ends at its last checkpoint
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        svc.down()
    # The undisturbed step time: the mean over consecutive steps (saves included, as a run
    # pays them), not the median, so that steps x step_s is the time they took in all.
    steady = [t2 - t1 for (t1, s1), (t2, s2) in zip(run.steps, run.steps[1:]) if s2 == s1 + 1]
    step_s = statistics.mean(steady) if steady else float("nan")
    done = max((s for _, s in run.steps), default=0)
    first_step = run.steps[0][1] if run.steps else 0
    rows = recoveries(kills, run)
    lost = [r["detect_s"] + r["restart_restore_s"] + (r["first_step_s"] or 0) + r["steps_recomputed"] * step_s
            for r in rows if r["restarted"]]
    lost += [r["stall_s"] for r in rows if not r["restarted"] and r["stall_s"] is not None]
    mean_lost = statistics.mean(lost) if lost else 0.0
    result = {"kill": args.kill, "every_s": args.every, "wall_s": round(wall, 1), "faults": len(kills),
              "step_s": step_s, "steps_done": done - first_step, "checkpoint_every": args.checkpoint_every,
              "ettr_measured": (done - first_step) * step_s / wall if wall else None,
              "mean_cost_per_failure_s": mean_lost,
              "ettr_one_failure_per_10_min": 600 / (600 + mean_lost), "ettr_one_failure_per_30_min": 1800 / (1800 + mean_lost),
              "recoveries": rows, "step_times": [[round(t - run.t0, 3), st] for t, st in run.steps]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| fault | faults | wall s | step s | ETTR measured (every {args.every:.0f} s) | cost per failure s | "
          "ETTR at 1 per 10 min | ETTR at 1 per 30 min |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.kill} | {len(kills)} | {wall:.0f} | {step_s:.3f} | {result['ettr_measured']:.1%} | {mean_lost:.1f} | "
          f"{result['ettr_one_failure_per_10_min']:.1%} | {result['ettr_one_failure_per_30_min']:.1%} |")
    print()
    print("| kill at s | restarted | detect s | restart+restore s | first step s | steps recomputed | stall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kill_s']} | {r['restarted']} | {r.get('detect_s', '-')} | {r.get('restart_restore_s', '-')} | "
              f"{r.get('first_step_s', '-')} | {r['steps_recomputed']} | {r.get('stall_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
