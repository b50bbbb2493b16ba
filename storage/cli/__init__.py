"""Command line (``python run.py ...``, the ``storage-element`` script): serving one
process or N workers with a graceful SIGTERM, migrations, dev tokens and the ops commands."""
