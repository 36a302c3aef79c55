"""Apply ``db/schema.sql`` to the database: ``python -m shortener.migrate [SCHEMA]``.

The schema only uses ``IF NOT EXISTS`` statements, so running this again is a no-op.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg

from shortener.config import ConfigError, Settings

#: The schema file shipped next to the package (``/app/db/schema.sql`` in the image).
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "db" / "schema.sql"


def apply_schema(database_url: str, schema_path: Path = SCHEMA_PATH) -> None:
    """Run the statements of ``schema_path`` in one transaction."""
    sql = schema_path.read_text(encoding="utf-8")
    with psycopg.connect(database_url) as conn:
        # Without parameters psycopg sends the whole script as one simple query.
        conn.execute(sql.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in {"-h", "--help"}):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    schema_path = Path(args[0]) if args else SCHEMA_PATH
    try:
        settings = Settings.from_env()
        apply_schema(settings.database_url, schema_path)
    except (ConfigError, OSError, psycopg.Error) as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    print(f"migrate: applied {schema_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
