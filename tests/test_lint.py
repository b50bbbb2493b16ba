"""The README test command also lints: ruff with the DTZ rules over the whole tree."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "storage", "tests", "bench", "run.py", "migrations"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_sql_outside_sql_and_migrations():
    import re

    pattern = re.compile(r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM)\b[^\n]*\b(FROM|SET|VALUES)\b")
    offenders = [
        str(path.relative_to(ROOT)) for path in (ROOT / "storage").rglob("*.py")
        if path.name not in ("migrate.py", "embedded.py") and pattern.search(path.read_text())
    ]
    assert offenders == []
