"""The one wrapper around docker-py, and the only module that imports it.

It connects (and closes), stamps the job's labels on every container and network it
creates, turns docker-py and requests errors into ours in one function (:func:`translate`),
raises the errors engines report inside 200 streams (:func:`checked_stream`), and runs
commands in containers one way (:meth:`Engine.start_exec`).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import docker
import docker.api.build
import docker.auth
import docker.errors
import docker.utils.build
import requests
import requests.exceptions
import urllib3.exceptions

from layerkeep.core.errors import (
    BuildFailed,
    DockerOperationError,
    EngineUnavailable,
    LayerkeepError,
    ResourceConflict,
    ResourceNotFound,
)
from layerkeep.core.job import BUILD_ID_LABEL as BUILD_ID_LABEL  # noqa: PLC0414 - re-exported
from layerkeep.core.job import PROJECT_LABEL as PROJECT_LABEL  # noqa: PLC0414 - re-exported
from layerkeep.core.job import Job
from layerkeep.core.settings import Settings

# What docker-py raises (requests' errors escape it for lost connections and timeouts):
# the task layer's last resort catches these and passes them to translate().
ENGINE_ERRORS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
)
# Reading a stream can also raise urllib3's own errors (a read timeout, a cut connection).
_STREAM_ERRORS: tuple[type[Exception], ...] = (*ENGINE_ERRORS, urllib3.exceptions.HTTPError)
DEFAULT_TIMEOUT = 120
# A build's longest silence (apt unpacking postgresql, pip compiling) is well under this.
BUILD_TIMEOUT = 900
_LAST_LINES = 20
# docker-py's connection pool holds ten connections.
_INSPECT_THREADS = 8


@dataclass(frozen=True)
class ExecResult:
    """How a command run in a container ended: its exit code and output (both streams)."""

    exit_code: int
    output: str


class RunningExec:
    """A command started in a container; :meth:`result` waits for it, or only a while.

    It runs on a daemon thread, so a command that hangs never holds its caller past the
    wait it chose, nor the process at exit.
    """

    def __init__(self, api: docker.APIClient, exec_id: str, action: str) -> None:
        self.exec_id = exec_id
        self._future: Future[ExecResult] = Future()
        self._api = api
        self._action = action
        threading.Thread(target=self._run, name=f"exec-{exec_id[:12]}", daemon=True).start()

    def _run(self) -> None:
        try:
            raw = self._api.exec_start(self.exec_id)
            code = self._api.exec_inspect(self.exec_id).get("ExitCode")
            output = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            self._future.set_result(ExecResult(1 if code is None else int(code), output))
        except ENGINE_ERRORS as error:
            self._future.set_exception(translate(error, action=self._action))
        except Exception as error:
            # Anything else (a client closed meanwhile) is the caller's to see, as it is.
            self._future.set_exception(error)

    def result(self, timeout: float | None = None) -> ExecResult | None:
        """The result once the command ended; None if it still runs after ``timeout`` s."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            return None


@dataclass(frozen=True)
class Engine:
    """A connected Docker engine, the job it works for, and the labels it stamps.

    ``labels`` always include the job's (an engine without a job, for stand-ins and
    tests, stamps only the labels it was given). Close it, or use it as a context manager.
    """

    client: docker.DockerClient
    where: str
    labels: Mapping[str, str]
    job: Job | None = field(default=None)

    def __post_init__(self) -> None:
        if self.job is not None:
            object.__setattr__(self, "labels", {**self.labels, **self.job.labels})

    @property
    def api(self) -> docker.APIClient:
        """The low-level client, for tests only: layerkeep's modules call the methods below."""
        return self.client.api

    def for_job(self, job: Job) -> Engine:
        """This connection working for ``job``: its labels on top of ours."""
        return dataclasses.replace(self, job=job)

    def job_for(self, settings: Settings) -> Job:
        """The job this engine works for, which must be the one ``settings`` describe."""
        if self.job is None or (self.job.project, self.job.build_id) != (
            settings.project, settings.build_id,
        ):
            raise LayerkeepError(
                f"the engine at {self.where} works for {self.job or 'no job'}, not for "
                f"project {settings.project} build {settings.build_id}",
                hint="connect(environ, job=Job.from_settings(settings))",
            )
        return self.job

    def close(self) -> None:
        """Release the client's connections."""
        self.client.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- images --------------------------------------------------------------------------

    def image_id(self, reference: str) -> str | None:
        """The id of a local image, or None when the engine lacks it."""
        attrs = self.image_attrs(reference)
        return None if attrs is None else str(attrs["Id"])

    def build(
        self,
        context: Path,
        *,
        tag: str,
        dockerfile: str | None = None,
        target: str | None = None,
        cache_from: Sequence[str] = (),
        build_args: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        nocache: bool = False,
        exclude: Sequence[str] = (),
        on_line: Callable[[str], None] = lambda _: None,
    ) -> str:
        """Build with the classic builder (never pulling) as ``tag``; return the image id.

        The context is sent without what ``.dockerignore`` and the ``exclude`` patterns
        (same syntax, applied after it) leave out. Each output line goes to ``on_line``;
        a failure raises BuildFailed with the last lines of output.
        """
        tail: deque[str] = deque(maxlen=_LAST_LINES)
        built: str | None = None
        name, archive = _context_archive(context, dockerfile, exclude)
        try:
            chunks = self.api.build(
                fileobj=archive,
                custom_context=True,
                dockerfile=name,
                tag=tag,
                target=target,
                cache_from=list(cache_from),
                buildargs=dict(build_args or {}),
                labels=dict(labels or {}),
                decode=True,
                rm=True,
                forcerm=True,
                pull=False,
                nocache=nocache,
                timeout=BUILD_TIMEOUT,
            )
            for chunk in checked_stream(chunks, action="build", image=tag):
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        tail.append(line.rstrip())
                        on_line(line.rstrip())
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    built = str(aux["ID"])
        except DockerOperationError as error:
            raise BuildFailed(error.message, image=tag, last_lines=list(tail)) from None
        except (docker.errors.APIError, requests.exceptions.RequestException) as error:
            raise BuildFailed(
                f"build {tag} failed: {_first_line(error)}", image=tag, last_lines=list(tail)
            ) from None
        finally:
            archive.close()
        found = self.image_id(tag)
        if found is None or (built is not None and found != built):
            raise BuildFailed(
                f"build {tag} ended without tagging an image", image=tag, last_lines=list(tail)
            )
        return found

    def image_attrs(self, reference: str) -> dict[str, Any] | None:
        """The engine's inspect record of a local image, or None."""
        try:
            return dict(self.api.inspect_image(reference))
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as error:
            # An invalid reference is answered with 400, not 404.
            if error.status_code == 400:
                return None
            raise translate(error, action=f"inspect image {reference}", image=reference) from None
        except requests.exceptions.RequestException as error:
            raise translate(error, action=f"inspect image {reference}", image=reference) from None

    def tag_image(self, image: str, reference: str) -> None:
        """Give ``image`` (a name or id) the name ``reference`` (``repository:tag``)."""
        repository, tag = _split(reference)
        with _translated(f"tag {image} as {reference}", resource=image, image=reference):
            self.api.tag(image, repository, tag)

    def remove_image(self, image: str, *, prune: bool = True, force: bool = False) -> bool:
        """Remove a name (or the image by id); False when it was already gone.

        ``prune`` also removes untagged parents; an image still in use raises
        ResourceConflict.
        """
        try:
            with _translated(f"remove image {image}", resource=image, image=image):
                self.api.remove_image(image, force=force, noprune=not prune)
        except ResourceNotFound:
            return False
        return True

    def import_image(
        self, chunks: Iterable[bytes], *, reference: str, changes: Sequence[str]
    ) -> str:
        """Import a root filesystem tar stream as an untagged image; return its id."""
        with _translated(f"import of {reference}", image=reference):
            answer = self.api.import_image(src=chunks, changes=list(changes), stream_src=True)
        records = [json.loads(line) for line in str(answer).splitlines() if line.strip()]
        image_id = ""
        for record in checked_stream(records, action="import", image=reference):
            status = str(record.get("status", ""))
            if status.startswith("sha256:"):
                image_id = status
        if not image_id:
            raise DockerOperationError(
                f"import of {reference} answered no image id", image=reference
            )
        return image_id

    def push(
        self,
        reference: str,
        *,
        auth: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> Iterator[Mapping[str, Any]]:
        """Push ``repository:tag``: its decoded progress records, in-band errors raised.

        A ``deadline`` (a ``time.monotonic()`` value) stops the push there: the engine
        cancels it, and TimeLimitReached is raised.
        """
        repository, tag = _split(reference)
        return self._stream(
            lambda api: api.push(
                repository, tag=tag, auth_config=_auth(auth), stream=True, decode=True
            ),
            action="push",
            image=reference,
            deadline=deadline,
        )

    def pull(
        self,
        reference: str,
        *,
        auth: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> Iterator[Mapping[str, Any]]:
        """Pull ``repository:tag``: its decoded progress records, in-band errors raised.

        A ``deadline`` stops it as it does :meth:`push`.
        """
        repository, tag = _split(reference)
        return self._stream(
            lambda api: api.pull(
                repository, tag=tag, auth_config=_auth(auth), stream=True, decode=True
            ),
            action="pull",
            image=reference,
            deadline=deadline,
        )

    def registry_digest(
        self,
        reference: str,
        *,
        auth: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> str:
        """The manifest digest the registry holds for ``reference`` (asked via the engine).

        A ``deadline`` stops the question there, as it does :meth:`push`.
        """
        action = f"look up {reference}"
        with _translated(action, resource=reference, image=reference):
            if deadline is None:
                found = self.api.inspect_distribution(reference, auth_config=_auth(auth))
            else:
                with _TimeLimit(self.api, deadline, action=action, image=reference) as limit:
                    try:
                        found = limit.api.inspect_distribution(
                            reference, auth_config=_auth(auth)
                        )
                    except ENGINE_ERRORS:
                        limit.finish(failed=True)
                        raise
                    limit.finish(failed=False)
        return str(found["Descriptor"]["digest"])

    def save_image(self, reference: str) -> Iterator[bytes]:
        """`docker save` of one image, as the engine streams it (either layout)."""
        with _translated(f"docker save {reference}", resource=reference, image=reference):
            yield from self.api.get_image(reference, chunk_size=1 << 20)

    def save_images(self, references: Sequence[str]) -> Iterator[bytes]:
        """One `docker save` of several images: a layer they share is in it once."""
        label = ", ".join(references)
        with _translated(f"docker save {label}", resource=label, image=label):
            # docker-py's get_image takes one name; the endpoint takes several.
            response = self.api._get(
                self.api._url("/images/get"),
                params={"names": list(references)},
                stream=True,
            )
            yield from self.api._stream_raw_result(
                response, chunk_size=1 << 20, decode=False
            )

    def layers_size(self) -> int | None:
        """The bytes every image layer of the engine takes on disk; None when the engine is
        busy with another disk-usage query (a figure, which must never fail a job).

        Docker before 23 answers one such query at a time and fails the others (500, "a
        disk usage operation is already running"): another job's build asks too.
        """
        try:
            with _translated("ask the engine its disk usage"):
                return int(self.api.df().get("LayersSize") or 0)
        except DockerOperationError as error:
            if "a disk usage operation is already running" in error.message:
                return None
            raise

    def load_archive(self, chunks: Iterable[bytes], *, image: str) -> None:
        """`docker load` of a tar stream; in-band errors raised.

        A LayerkeepError raised while producing ``chunks`` (a damaged cache file) comes
        out as itself, not as the connection error it causes.
        """
        try:
            with _translated(f"docker load {image}", image=image):
                # An iterator, not a list: requests would send a list as form fields.
                for _ in checked_stream(
                    self.api.load_image(iter(chunks)), action="docker load", image=image
                ):
                    pass
        except DockerOperationError as error:
            cause = error.__cause__
            for source in (cause, cause.__context__ if cause else None):
                if isinstance(source, LayerkeepError):
                    raise source from None
            raise

    def uses_containerd_store(self) -> bool:
        """Whether images live in containerd's image store (Docker 29's default)."""
        with _translated("ask the engine its storage driver"):
            info = self.api.info()
        return any(
            "containerd.snapshotter" in str(value) for _, value in info.get("DriverStatus") or []
        )

    def local_images(self) -> list[dict[str, Any]]:
        """The inspect record of every local image (intermediate ones included)."""
        with _translated("list images"):
            summaries = self.api.images(all=True)
        # One inspect per image, a few at a time: an engine with a hundred images answers
        # in a tenth of the time it takes one by one.
        with ThreadPoolExecutor(max_workers=_INSPECT_THREADS) as pool:
            found = list(pool.map(self.image_attrs, [str(s["Id"]) for s in summaries]))
        return [attrs for attrs in found if attrs is not None]

    def build_cache_entries(self) -> int | None:
        """What the engine could reuse without any cached image: BuildKit's cache records
        plus images the classic builder made here (they have a parent).

        None when the engine cannot tell right now (it answers one disk-usage query at a
        time: another build's asks first): a figure for the build line, never a failure.
        """
        try:
            with _translated("ask the engine about its build cache"):
                usage = self.api.df()
                summaries = self.api.images(all=True)
        except DockerOperationError:
            return None
        built_here = sum(1 for summary in summaries if summary.get("ParentId"))
        return len(usage.get("BuildCache") or []) + built_here

    def server_version(self) -> dict[str, Any]:
        """The engine's version record (Version, ApiVersion, Os, ...)."""
        with _translated("ask the engine its version"):
            return dict(self.api.version())

    def _stream(
        self,
        open_stream: Callable[[docker.APIClient], Iterable[Mapping[str, Any]]],
        *,
        action: str,
        image: str,
        deadline: float | None = None,
    ) -> Iterator[Mapping[str, Any]]:
        # Errors can come when the call is made or while the stream is read.
        with _translated(f"{action} {image}", resource=image, image=image):
            if deadline is None:
                yield from checked_stream(open_stream(self.api), action=action, image=image)
                return
            with _TimeLimit(self.api, deadline, action=f"{action} {image}", image=image) as limit:
                try:
                    for chunk in checked_stream(
                        open_stream(limit.api), action=action, image=image
                    ):
                        if limit.reached():
                            limit.cut()
                            break
                        yield chunk
                except _STREAM_ERRORS as error:
                    # A cut connection ends the stream with whatever error it causes.
                    limit.finish(failed=True)
                    raise translate(error, action=f"{action} {image}", image=image) from error
                limit.finish(failed=False)

    # --- networks ------------------------------------------------------------------------

    def ensure_network(self, name: str, *, labels: Mapping[str, str] | None = None) -> str:
        """The id of a user-defined bridge network ``name``, created (labelled) if missing."""
        found = self.find_network(name)
        if found is not None:
            return str(found["Id"])
        try:
            with _translated(f"create network {name}", resource=name):
                created = self.api.create_network(
                    name, driver="bridge", labels={**self.labels, **(labels or {})},
                    check_duplicate=True,
                )
        except ResourceConflict:
            # Created by someone else since we looked.
            found = self.find_network(name)
            if found is None:
                raise
            return str(found["Id"])
        return str(created["Id"])

    def find_network(self, name: str) -> dict[str, Any] | None:
        """The network named exactly ``name`` (the engine's filter also matches parts)."""
        with _translated(f"list networks named {name}", resource=name):
            networks = self.api.networks(names=[name])
        return next((dict(n) for n in networks if n["Name"] == name), None)

    def inspect_network(self, network: str) -> dict[str, Any] | None:
        """A network's inspect record, or None when it does not exist."""
        try:
            with _translated(f"inspect network {network}", resource=network):
                return dict(self.api.inspect_network(network))
        except ResourceNotFound:
            return None

    def list_networks(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Networks carrying every label in ``labels`` (``key`` or ``key=value``)."""
        with _translated("list networks"):
            return [dict(n) for n in self.api.networks(filters={"label": list(labels)})]

    def remove_network(self, network: str) -> bool:
        """Remove a network; False when it was already gone."""
        try:
            with _translated(
                f"remove network {network}", resource=network,
                hint=f"disconnect what still uses it (docker network inspect {network})",
            ):
                self.api.remove_network(network)
        except ResourceNotFound:
            return False
        return True

    # --- containers ----------------------------------------------------------------------

    def create_container(
        self,
        image: str,
        *,
        name: str,
        network: str,
        aliases: Sequence[str] = (),
        command: str | Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        mounts: Sequence[tuple[str, str, bool]] = (),
        ports: Mapping[int, int] | None = None,
        working_dir: str | None = None,
        entrypoint: str | Sequence[str] | None = None,
    ) -> str:
        """Create (not start) a labelled container on ``network``; returns its id.

        ``mounts`` are (host path, container path, read only); ``ports`` map a container
        port to a host port published on 127.0.0.1 only.
        """
        hint = (
            "another run with the same project and build id holds the name: wait for it, "
            "or set LAYERKEEP_BUILD_ID"
        )
        with _translated(f"create container {name}", resource=name, image=image, hint=hint):
            host_config = self.api.create_host_config(
                binds={source: {"bind": target, "mode": "ro" if ro else "rw"}
                       for source, target, ro in mounts},
                port_bindings={port: ("127.0.0.1", host) for port, host in (ports or {}).items()},
                network_mode=network,
            )
            networking = self.api.create_networking_config(
                {network: self.api.create_endpoint_config(aliases=list(aliases))}
            )
            created = self.api.create_container(
                image,
                name=name,
                command=command,
                environment=dict(environment or {}),
                labels={**self.labels, **(labels or {})},
                host_config=host_config,
                networking_config=networking,
                ports=list((ports or {}).keys()),
                working_dir=working_dir,
                entrypoint=entrypoint,
            )
        return str(created["Id"])

    def start_container(self, container: str) -> None:
        """Start a created container."""
        with _translated(f"start container {container}", resource=container):
            self.api.start(container)

    def wait_container(self, container: str, *, timeout: float | None = None) -> int:
        """Wait until the container exits (at most ``timeout`` s); its exit code."""
        with _translated(f"wait for container {container}", resource=container):
            status = self.api.wait(container, timeout=timeout)
        return int(status.get("StatusCode", 1))

    def inspect_container(self, container: str) -> dict[str, Any] | None:
        """A container's inspect record (``State``, ``Config``, ...), or None when gone."""
        try:
            with _translated(f"inspect container {container}", resource=container):
                return dict(self.api.inspect_container(container))
        except ResourceNotFound:
            return None

    def list_containers(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Containers, running or not, carrying every label (``key`` or ``key=value``)."""
        with _translated("list containers"):
            found = self.api.containers(all=True, filters={"label": list(labels)})
        return [dict(c) for c in found]

    def container_output(self, container: str, *, tail: int | None = None) -> str:
        """What the container printed so far (both streams), the last ``tail`` lines."""
        with _translated(f"read the logs of {container}", resource=container):
            raw = self.api.logs(container, stdout=True, stderr=True, tail=tail or "all")
        return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)

    def follow_output(self, container: str) -> Iterator[str]:
        """The container's output lines as they come, until it exits."""
        with _translated(f"read the logs of {container}", resource=container):
            yield from _lines(self.api.logs(container, stream=True, follow=True))

    def put_archive(self, container: str, path: str, data: bytes) -> None:
        """Unpack the tar archive ``data`` into the container at ``path``."""
        with _translated(f"copy files into {container}", resource=container):
            self.api.put_archive(container, path, data)

    def remove_container(self, container: str) -> bool:
        """Force-remove a container and its anonymous volumes; False when already gone.

        Someone else removing it at the same moment (409) counts as gone.
        """
        try:
            with _translated(f"remove container {container}", resource=container):
                self.api.remove_container(container, force=True, v=True)
        except (ResourceNotFound, ResourceConflict):
            return False
        return True

    def start_exec(
        self,
        container: str,
        command: Sequence[str],
        *,
        environment: Mapping[str, str] | None = None,
    ) -> RunningExec:
        """Start ``command`` in a running container; the one way we run commands in one.

        Values in ``environment`` stay off command lines (a password for psql). A
        container that is not running raises ResourceConflict; a missing one,
        ResourceNotFound.
        """
        action = f"run {command[0]} in {container}"
        with _translated(action, resource=container):
            created = self.api.exec_create(
                container, list(command), environment=dict(environment or {})
            )
        return RunningExec(self.api, str(created["Id"]), action)

    def exec(
        self,
        container: str,
        command: Sequence[str],
        *,
        environment: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``command`` in a running container to its end (bounded by the client timeout)."""
        result = self.start_exec(container, command, environment=environment).result()
        assert result is not None  # no timeout: it waited for the end
        return result


class TimeLimitReached(DockerOperationError):
    """An engine request stopped at its deadline (the engine cancels it)."""


class _TimeLimit:
    """Stops one engine request at ``deadline`` (a ``time.monotonic()`` value).

    The engine goes on with a push or pull while its client listens (and retries a
    failing layer upload itself for about 50 s), and cancels it once the client hangs
    up; so at the deadline the request's connection is shut down. ``api`` is a copy of
    the client, sharing its connection pool, with a hook that keeps the request's
    response (to find that connection) and a socket timeout no longer than the time
    left, for a request that gets no answer at all.
    """

    def __init__(self, api: docker.APIClient, deadline: float, *, action: str, image: str):
        self.deadline = deadline
        self._message = f"{action} failed: stopped at the time limit"
        self._image = image
        left = max(deadline - time.monotonic(), 0.001)
        self.api = object.__new__(type(api))
        self.api.__dict__.update(api.__dict__)
        self.api.hooks = {"response": [self._keep]}

        def bounded(kwargs: dict[str, Any]) -> dict[str, Any]:
            # docker-py asks for no timeout at all on pulls: the engine answers a pull
            # only once the registry has, so the time left is its socket timeout.
            kwargs["timeout"] = left
            return kwargs

        self.api._set_request_timeout = bounded
        self._responses: list[requests.Response] = []
        self._lock = threading.Lock()
        self._cut = False
        self._done = False
        self._timer = threading.Timer(left, self.cut)
        self._timer.daemon = True

    def _keep(self, response: requests.Response, *_: Any, **__: Any) -> requests.Response:
        self._responses.append(response)
        return response

    def reached(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self.deadline

    def cut(self) -> None:
        """Shut the request's connection down, unless the request already ended."""
        with self._lock:
            if self._done or self._cut:
                return
            self._cut = True
            for response in self._responses:
                connection = getattr(response.raw, "connection", None)
                sock = getattr(connection, "sock", None)
                if isinstance(sock, socket.socket):
                    with suppress(OSError):  # closed already
                        sock.shutdown(socket.SHUT_RDWR)

    def finish(self, *, failed: bool) -> None:
        """End the request; raise TimeLimitReached if it was cut, or ``failed`` late.

        A request that ended well just as the deadline passed stands.
        """
        with self._lock:
            self._done = True
            stopped = self._cut or (failed and time.monotonic() >= self.deadline)
        if stopped:
            raise TimeLimitReached(self._message, image=self._image)

    def __enter__(self) -> _TimeLimit:
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with self._lock:
            self._done = True
            cut = self._cut
        self._timer.cancel()
        if cut:
            # Shut down is not closed: close it here, once no one reads from it.
            for response in self._responses:
                response.close()


def describe_host(environ: Mapping[str, str]) -> str:
    """Where docker-py looks for the engine, in words a user can check."""
    host = environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={host}" if host else "unix:///var/run/docker.sock (DOCKER_HOST unset)"


def connect(
    environ: Mapping[str, str],
    *,
    job: Job | None = None,
    labels: Mapping[str, str] | None = None,
    timeout: int = DEFAULT_TIMEOUT,
) -> Engine:
    """Connect to the engine named by ``environ`` (DOCKER_HOST & co.) and check it answers.

    What it creates carries the job's labels; ``labels`` are for callers without a job
    (stand-ins, tests) or extra ones.
    """
    where = describe_host(environ)
    hint = "start it (`sudo systemctl start docker`, or `dockerd &` as root) or set DOCKER_HOST"
    client: docker.DockerClient | None = None
    try:
        client = docker.DockerClient(
            **docker.utils.kwargs_from_env(environment=dict(environ)), timeout=timeout
        )
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        if client is not None:
            client.close()
        raise EngineUnavailable(
            f"cannot reach the Docker engine at {where}: {_first_line(error)}", hint=hint
        ) from error
    return Engine(client=client, where=where, labels=dict(labels or {}), job=job)


def docker_login(registry: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The user and password `docker login` stored for ``registry``, or None.

    Read from ``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``) by docker-py's
    reader, the one that hands the engine our login on push and pull when no user is set:
    the same host matching, the same credential helpers (``credsStore``, ``credHelpers``).
    """
    folder = environ.get("DOCKER_CONFIG")
    home = Path(environ.get("HOME") or Path.home())
    path = Path(folder) / "config.json" if folder else home / ".docker" / "config.json"
    if not path.is_file():
        return None
    action = f"read the docker login for {registry} from {path}"
    try:
        with warnings.catch_warnings():
            # docker-py warns of a missing helper, then raises: the error says it.
            warnings.simplefilter("ignore")
            config = docker.auth.load_config(str(path), credstore_env=dict(environ))
            found = docker.auth.resolve_authconfig(config, registry) or {}
    except docker.errors.DockerException as error:
        raise translate(error, action=action) from None
    if "IdentityToken" in found:
        raise DockerOperationError(
            f"{action} failed: it is an identity token, which layerkeep cannot use",
            hint="set LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD",
        )
    # Entries of `auths` are lowercase, a helper's answer capitalised.
    user = found.get("username") or found.get("Username")
    password = found.get("password") or found.get("Password") or ""
    return (str(user), str(password)) if user else None


def translate(
    error: BaseException,
    *,
    action: str = "",
    resource: str = "",
    image: str = "",
    hint: str = "",
) -> DockerOperationError:
    """The one place a docker-py or requests error becomes ours, as one line.

    404 becomes ResourceNotFound and 409 ResourceConflict, both naming ``resource``; the
    engine's own explanation is kept (its status too), so a 409 on a name clash says which
    container holds the name.
    """
    status: int | None = None
    if isinstance(error, docker.errors.APIError):
        status = error.status_code
        explanation = error.explanation
        if isinstance(explanation, bytes):
            explanation = explanation.decode(errors="replace")
        detail = str(explanation) if explanation else str(error)
    elif isinstance(error, requests.exceptions.RequestException):
        detail = f"{type(error).__name__}: {error}"
    else:
        detail = str(error) or type(error).__name__
    # One line: engines explain across lines, and requests nests reasons.
    detail = " ".join(detail.split())
    message = f"{action} failed: {detail}" if action else f"the Docker engine failed: {detail}"
    if status == 404:
        return ResourceNotFound(message, resource=resource, image=image, hint=hint)
    if status == 409:
        return ResourceConflict(message, resource=resource, image=image, hint=hint)
    return DockerOperationError(message, image=image, hint=hint, status=status)


@contextmanager
def _translated(
    action: str, *, resource: str = "", image: str = "", hint: str = ""
) -> Iterator[None]:
    try:
        yield
    except ENGINE_ERRORS as error:
        raise translate(
            error, action=action, resource=resource, image=image, hint=hint
        ) from error


def _split(reference: str) -> tuple[str, str]:
    """``repository:tag`` as its two parts; no tag (a registry port is not one) is latest."""
    repository, _, tag = reference.rpartition(":")
    if "/" in tag or not repository:
        return reference, "latest"
    return repository, tag


def _auth(auth: Mapping[str, str] | None) -> dict[str, str] | None:
    # None lets docker-py send what ~/.docker/config.json holds (docker login).
    return dict(auth) if auth else None


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


def checked_stream(
    chunks: Iterable[Mapping[str, Any]], *, action: str, image: str
) -> Iterator[Mapping[str, Any]]:
    """Pass decoded stream records through, raising on the errors engines send in-band.

    Push, pull, load and build answer 200 and report failure inside the stream. The
    stream is read to its end before raising, so its connection is released.
    """
    records = iter(chunks)
    for chunk in records:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = str(chunk.get("error") or detail.get("message") or "unknown error")
            for _ in records:
                pass
            raise DockerOperationError(f"{action} {image} failed: {message.strip()}", image=image)
        yield chunk


def image_layers(attrs: Mapping[str, Any]) -> tuple[str, ...]:
    """The diff ids of an image's layers, bottom first, from its inspect record."""
    return tuple(str(digest) for digest in (attrs.get("RootFS") or {}).get("Layers") or [])


def image_content(attrs: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """What names one image on either image store, where its ids differ (the classic
    store's is its config's digest, the containerd store's its manifest's): its layers
    and creation time, from its inspect record."""
    return image_layers(attrs), str(attrs.get("Created", ""))


def context_files(context: Path, rules: Sequence[str]) -> list[str]:
    """Paths (files and folders, ``/``-separated, relative) a build sees in ``context``.

    ``rules`` are .dockerignore patterns in order, matched by docker-py's matcher (the one
    the context tar uses). Unlike the tar, the Dockerfile is not put back: a builder
    drops an ignored Dockerfile from what COPY can read.
    """
    walked = docker.utils.build.PatternMatcher(list(rules)).walk(str(context))
    return sorted(walked)


def _context_archive(
    context: Path, dockerfile: str | None, exclude: Sequence[str]
) -> tuple[str | None, IO[bytes]]:
    """The context tar docker-py would send, minus ``exclude``; and the Dockerfile's name in it.

    docker-py has no parameter for extra patterns, so this does what ``api.build(path=...)``
    does (same .dockerignore reading, same matcher, a Dockerfile outside the context added
    under a generated name) with the patterns appended: later patterns win.
    """
    rules: list[str] = []
    ignore = context / ".dockerignore"
    if ignore.is_file():
        lines = (line.strip() for line in ignore.read_text(encoding="utf-8").splitlines())
        rules = [line for line in lines if line and not line.startswith("#")]
    name, contents = docker.api.build.process_dockerfile(dockerfile, str(context))
    archive = docker.utils.build.tar(
        str(context), exclude=[*rules, *exclude], dockerfile=(name, contents)
    )
    return name, archive


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
