"""WSGI entry point for gunicorn: ``gunicorn shortener.wsgi:app``."""

from shortener.app import create_app

app = create_app()
