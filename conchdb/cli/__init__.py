"""The `conchdb` command line: `app` (the Typer app) and `main` (the console script).

`app.py` holds the app, the error handling and the shared options; each command group
lives in its own module, which registers its commands on import; `tables.py` and
`summaries.py` render results for the terminal.
"""

from conchdb.cli import (  # noqa: F401  (register the commands)
    annotations,
    archive,
    copy,
    embed,
    features,
    ingest,
    search,
    serve,
    slide_search,
    texts,
    tiles,
    workers,
)
from conchdb.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
