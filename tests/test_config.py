import subprocess
import sys
from pathlib import Path

import pytest

from storage.config import Config, ConfigError, validate_prefix

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_artstore():
    c = Config.from_env({})
    assert (c.server_port, c.table_prefix, c.app_mode, c.storage_type) == (
        8000, "storage_elem_01", "rw", "local")
    assert c.embedded and c.dsn is None


@pytest.mark.parametrize("raw,value", [("on", True), ("OFF", False), ("true", True),
                                       ("0", False), ("1", True), ("False", False)])
def test_booleans_accept_on_off_true_false_1_0(raw, value):
    assert Config.from_env({"METRICS_ENABLED": raw}).metrics_enabled is value


@pytest.mark.parametrize("env,needle", [
    ({"DB_TABLE_PREFIX": "Bad-Name"}, "DB_TABLE_PREFIX"),
    ({"DB_TABLE_PREFIX": "a" * 33}, "DB_TABLE_PREFIX"),
    ({"DB_TABLE_PREFIX": "x;drop"}, "DB_TABLE_PREFIX"),
    ({"APP_MODE": "x"}, "APP_MODE"),
    ({"SERVER_PORT": "http"}, "SERVER_PORT"),
    ({"SERVER_PORT": "70000"}, "SERVER_PORT"),
    ({"METRICS_ENABLED": "maybe"}, "METRICS_ENABLED"),
    ({"STORAGE_TYPE": "ftp"}, "STORAGE_TYPE"),
    ({"CAPACITY_FULL_THRESHOLD": "50"}, "CAPACITY"),
    ({"CORS_ALLOW_ORIGINS": "*"}, "CORS_ALLOW_ORIGINS"),
    # the rebuild guards need the finished WAL rows for longer than a maintenance run
    ({"WAL_RETENTION_HOURS": "0"}, "WAL_RETENTION_HOURS"),
    ({"WAL_RETENTION_HOURS": "23"}, "WAL_RETENTION_HOURS"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        Config.from_env(env)


def test_database_url_wins_and_db_vars_build_a_uri():
    c = Config.from_env({"DATABASE_URL": "postgresql://u@/db?host=/run/pg", "DB_HOST": "h"})
    assert c.dsn == "postgresql://u@/db?host=/run/pg" and not c.embedded
    c = Config.from_env({"DB_HOST": "db", "DB_PASSWORD": "p@ss", "DB_PORT": "6543"})
    assert c.dsn == "postgresql://artstore:p%40ss@db:6543/artstore_storage_01"


def test_prefix_rule():
    assert validate_prefix("se_01") == "se_01"
    for bad in ("", "1abc", "Abc", "a-b", "a b", "é"):
        with pytest.raises(ConfigError):
            validate_prefix(bad)


@pytest.mark.parametrize("env", [{"DB_TABLE_PREFIX": "Bad-Name"}, {"APP_MODE": "x"}])
def test_bad_setting_stops_run_py_with_one_line_and_creates_nothing(tmp_path, env):
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py")], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(data), **env}, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and next(iter(env)) in lines[0] and "Traceback" not in proc.stderr
    assert not data.exists()
