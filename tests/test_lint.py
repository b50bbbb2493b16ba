"""The README test command also lints: ruff with the DTZ rules over the whole tree, and the
package's layering with import-linter (the contracts in setup.cfg, ``[importlinter]``)."""

import ast
import re
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


def test_imports_keep_the_layers():
    """cli > web > auth | observability > domain > db | backends > the shared leaves: no
    import points up, none between siblings on one level, and no cycle anywhere."""
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extra: pip install -e '.[test]'"
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


# SQL in a Python string literal (f-strings and implicitly joined literals included,
# whatever the case and however many lines): what a statement starts with.
SQL = re.compile(
    r"\bselect\b[\s\S]+?\bfrom\b|\binsert\s+into\b|\bupdate\s+[\w<>{}.\"]+\s+set\b"
    r"|\bdelete\s+from\b|\b(?:create|alter|drop)\s+(?:table|index|function|trigger|view)\b"
    r"|\btruncate\s+(?:table\s+)?[\w<>{}]", re.IGNORECASE)
SQL_ALLOWED = ("migrate.py", "embedded.py")  # yoyo bookkeeping; the embedded server's setup


def sql_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of the string literals in ``source`` that hold SQL; docstrings and
    comments (prose) are not code."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # f"...": its literal parts around {...}
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}"
                           for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            text = node.value
        else:
            continue
        if SQL.search(text):
            found.append((node.lineno, text[:80]))
    return found


def test_the_sql_guard_sees_sql_in_any_form():
    caught = [
        'q = "SELECT * FROM t WHERE id = $1"',
        'q = "select id from t"',
        'q = ("SELECT id, name\\n"\n     "  FROM t")',
        'q = f"""\n    delete from {prefix}_files\n    where id = $1\n"""',
        'q = f"UPDATE {p}_wal SET status = $2"',
        'q = "insert into t (a) values ($1)"',
        'q = "create index i on t (a)"',
        'q = "TRUNCATE t"',
    ]
    for source in caught:
        assert sql_strings(source), source
    prose = [
        '"""Select the rows from the cache and update the totals."""',
        'def f():\n    """Insert into the WAL, then delete from disk."""\n',
        '# SELECT * FROM t\nx = 1',
        'raise ValueError("could not delete the file")',
        'log.info("update of %s done", x)',
    ]
    for source in prose:
        assert sql_strings(source) == [], source


def test_no_sql_outside_sql_and_migrations():
    """SQL lives in sql/*.sql (and migrations/): none in the package's Python code."""
    offenders = [
        (str(path.relative_to(ROOT)), line, text)
        for path in sorted((ROOT / "storage").rglob("*.py")) if path.name not in SQL_ALLOWED
        for line, text in sql_strings(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
