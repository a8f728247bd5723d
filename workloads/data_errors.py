"""What bad input data raises, what loading counts, and how data text is printed."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the sample, `reason` classifies it for the counts."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadReport:
    """What loading a data file kept and skipped (data.on_bad_sample: skip), by reason."""

    path: str
    loaded: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # the first few messages, for the log

    def skip(self, e: DataError) -> None:
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(str(e))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.path}: {self.loaded} samples loaded, {self.total_skipped} skipped ({why})"


def printable(text, limit: int = 200) -> str:
    """Text from the data as it may be printed: control characters (ANSI escapes, line
    breaks) escaped, at most `limit` characters."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "..."
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
                   for c in s)
