"""Pages as a user's browser renders them: headless Chromium (Debian's `chromium`,
installed by `make test` when missing) runs the page's JavaScript and hands back the
DOM, and a screenshot when asked."""

from __future__ import annotations

import re
import shutil
import subprocess

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium on PATH: `make test` installs Debian's chromium package (apt-get install chromium)")


def render(url: str, *, screenshot: str | None = None, budget_ms: int = 20000, size: str = "1400,1000") -> str:
    """The page's visible text after its scripts ran (`budget_ms` of virtual time: the
    clock waits for the page's requests)."""
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--virtual-time-budget={budget_ms}", f"--window-size={size}", "--dump-dom"]
    if screenshot:
        cmd.append(f"--screenshot={screenshot}")
    dom = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())
