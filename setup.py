"""Packaging: the metadata is in setup.cfg; this maps the top-level ``sql/`` and
``migrations/`` into the wheel.

They stay at the top of the repository (the design: SQL and migrations beside the code,
not inside it) and ship as ``storage/_sql`` and ``storage/_migrations``, which
``storage.db.sql.bundled`` finds first in an installed copy (a checkout has none, so
plain ``pytest`` and editable installs read the top-level directories).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["storage", "storage.*"]),
              "storage._sql", "storage._migrations"],
    package_dir={"storage._sql": "sql", "storage._migrations": "migrations"},
    package_data={"storage._sql": ["*.sql"], "storage.web": ["openapi.json"]},
)
