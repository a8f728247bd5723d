"""Prints the fault suite's record as a table: `python -m tests.e2e.report out/faults.json`."""

import json
import sys


def table(rows: list[dict]) -> str:
    out = ["| fault | injected | survived | steps lost | data lost | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['fault']} | {r['injected']} | {r['survived']} | {r['steps_lost']} | {r['data_lost']} | "
                   f"{r.get('note', '')} |")
    total = {k: sum(r[k] for r in rows) for k in ("injected", "survived", "steps_lost", "data_lost")}
    out.append(f"| **all** | {total['injected']} | {total['survived']} | {total['steps_lost']} | "
               f"{total['data_lost']} | |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1]))))
