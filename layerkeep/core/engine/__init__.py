"""The one wrapper around docker-py, and the only package that imports it.

:func:`connect` gives an :class:`Engine` (``client``), whose calls are grouped by what
they act on: ``images`` (build, inspect, name; the classic builder's context tar in
``context_archive``), ``transfers`` (push, pull, save, load; ``deadlines`` stops a push,
a pull or a registry question at a time limit), ``networks`` and ``containers``. Each
stamps the job's labels on what it creates; ``translation`` turns docker-py and requests
errors into ours, also those engines report inside a 200 stream.

docker-py's private API, used in one place and checked by tests/test_docker_private_api.py
(docker is pinned below 8 for it): :meth:`Engine.save_images` calls ``APIClient._get``,
``_url`` and ``_stream_raw_result``, as docker-py's own ``get_image`` does, because that
method takes one name where the endpoint takes several (a layer the images share is then
saved once), and only ``_stream_raw_result`` lifts the socket timeout for a long save.
The time limits need none: their client is a copy of docker-py's (a ``requests.Session``)
that bounds every request in ``Session.send``.
"""

from layerkeep.core.engine.client import DEFAULT_TIMEOUT, Engine, connect, describe_host
from layerkeep.core.engine.containers import ExecResult, RunningExec
from layerkeep.core.engine.context_archive import context_files, read_ignore_file
from layerkeep.core.engine.deadlines import TimeLimitReached
from layerkeep.core.engine.images import image_content, image_layers
from layerkeep.core.engine.login import docker_login
from layerkeep.core.engine.translation import ENGINE_ERRORS, checked_stream, translate

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENGINE_ERRORS",
    "Engine",
    "ExecResult",
    "RunningExec",
    "TimeLimitReached",
    "checked_stream",
    "connect",
    "context_files",
    "describe_host",
    "docker_login",
    "image_content",
    "image_layers",
    "read_ignore_file",
    "translate",
]
