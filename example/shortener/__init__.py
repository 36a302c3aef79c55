"""A small URL shortener: links in PostgreSQL, hit counts in Redis.

``shortener.app.create_app`` builds the WSGI app, ``shortener.wsgi:app`` is what
gunicorn serves, and ``python -m shortener.migrate`` applies ``db/schema.sql``.
"""

__version__ = "1.0.0"
