"""Holds CPUs of a Ray cluster, as another team's job would: `python -m tests.e2e.hold_cpus
ADDRESS CPUS SECONDS` prints `holding` once its actor has them, and lets go after
SECONDS (or when stopped by PID)."""

import sys
import time

import ray


def main(address: str, cpus: float, seconds: float) -> None:
    ray.init(address=address, logging_level="ERROR")

    @ray.remote(num_cpus=cpus)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    print("holding", flush=True)
    time.sleep(seconds)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
