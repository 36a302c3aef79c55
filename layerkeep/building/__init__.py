"""Building the app image: the Dockerfile, its context, the build itself and what it reused."""
