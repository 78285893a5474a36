"""The README's two opening commands, and CI running exactly the second one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _opening_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    main_job, tests = _opening_commands()
    assert main_job.startswith("pip install") and "vall-e demo" in main_job
    assert tests.startswith("pip install") and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in [line.strip() for line in ci], ".ci/run must run the README's test command verbatim"
