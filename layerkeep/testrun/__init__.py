"""The job's test run: the app container, its database (db.init) and the tests (test.run)."""
