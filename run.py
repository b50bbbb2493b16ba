"""Entry point: ``python run.py`` serves the storage element (see README)."""

import sys

from storage.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
