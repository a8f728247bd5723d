"""The README's command blocks, as a newcomer copies them: every `longview` command parses
and its config loads with the flags it gives (a recipe that ends in `config error:` is a
broken recipe), every `longview plan` runs to its answer, and every `make` target it
names exists. The commands that train and evaluate run end to end in tests/e2e and
`make demo`; the ones that need a GPU cluster or the authors' checkpoints stop here at
their config.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import _parse_sets, build_parser
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(prefix: str) -> list[str]:
    """Every line of a README code block that starts with `prefix`, continuation lines
    joined and comments dropped."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(prefix + " "):
                out.append(line)
    return out


# Placeholders a reader replaces (a job id, a head's address): the grammar is not theirs to check.
PLACEHOLDER = re.compile(r"JOB_ID|<[a-z]+>|\|")
COMMANDS = [c for c in readme_commands("longview") if not PLACEHOLDER.search(c)]


def test_the_readme_names_the_commands_a_user_runs():
    names = {shlex.split(c)[1] for c in COMMANDS}
    assert {"up", "train", "submit", "eval", "experiment", "runs", "plan", "down"} <= names, names
    assert any("mm_niah" in c for c in COMMANDS)  # the MM-NIAH recipe is among them


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_parses_and_its_config_loads(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    config = getattr(args, "config", None)
    if config is None:
        return
    cfg = load_config(str(ROOT / config), overrides=_parse_sets(getattr(args, "set", [])))
    assert cfg.name


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] == "plan"])
def test_each_readme_plan_runs(command):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *shlex.split(command)[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


@pytest.mark.parametrize("command", readme_commands("make"))
def test_each_readme_make_target_exists(command):
    proc = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
