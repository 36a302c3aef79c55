"""Images in and out of the engine: push and pull (bounded by a deadline when asked),
the registry's digest of a tag, `docker save` and `docker load`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import docker

from layerkeep.core.engine.connection import Connection
from layerkeep.core.engine.deadlines import limited_call, limited_stream
from layerkeep.core.engine.images import repository_and_tag
from layerkeep.core.engine.translation import checked_stream, translated
from layerkeep.core.errors import DockerOperationError, LayerkeepError

_SAVE_CHUNK = 1 << 20
# docker-py's push and pull, called as ``method(api, repository, tag=..., ...)``.
_Transfer = Callable[..., Iterable[Mapping[str, Any]]]


class TransferCalls(Connection):
    """The Engine's calls that move images between it, registries and files."""

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
        return self._transfer(docker.APIClient.push, "push", reference, auth, deadline)

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
        return self._transfer(docker.APIClient.pull, "pull", reference, auth, deadline)

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

        def inspect(api: docker.APIClient) -> Mapping[str, Any]:
            found: Mapping[str, Any] = api.inspect_distribution(
                reference, auth_config=_auth(auth)
            )
            return found

        with translated(action, resource=reference, image=reference):
            if deadline is None:
                found = inspect(self.api)
            else:
                found = limited_call(
                    self.api, inspect, deadline=deadline, action=action, image=reference
                )
        return str(found["Descriptor"]["digest"])

    def save_image(self, reference: str) -> Iterator[bytes]:
        """`docker save` of one image, as the engine streams it (either layout)."""
        with translated(f"docker save {reference}", resource=reference, image=reference):
            yield from self.api.get_image(reference, chunk_size=_SAVE_CHUNK)

    def save_images(self, references: Sequence[str]) -> Iterator[bytes]:
        """One `docker save` of several images: a layer they share is in it once."""
        label = ", ".join(references)
        with translated(f"docker save {label}", resource=label, image=label):
            # docker-py's get_image takes one name, the endpoint several: this is its
            # body with the names as parameters (see the package's docstring).
            response = self.api._get(
                self.api._url("/images/get"), params={"names": list(references)}, stream=True
            )
            yield from self.api._stream_raw_result(
                response, chunk_size=_SAVE_CHUNK, decode=False
            )

    def load_archive(self, chunks: Iterable[bytes], *, image: str) -> None:
        """`docker load` of a tar stream; in-band errors raised.

        A LayerkeepError raised while producing ``chunks`` (a damaged cache file) comes
        out as itself, not as the connection error it causes.
        """
        try:
            with translated(f"docker load {image}", image=image):
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

    def _transfer(
        self,
        method: _Transfer,
        action: str,
        reference: str,
        auth: Mapping[str, str] | None,
        deadline: float | None,
    ) -> Iterator[Mapping[str, Any]]:
        repository, tag = repository_and_tag(reference)

        def open_stream(api: docker.APIClient) -> Iterable[Mapping[str, Any]]:
            return method(
                api, repository, tag=tag, auth_config=_auth(auth), stream=True, decode=True
            )

        # Errors can come when the call is made or while the stream is read.
        with translated(f"{action} {reference}", resource=reference, image=reference):
            if deadline is None:
                yield from checked_stream(open_stream(self.api), action=action, image=reference)
            else:
                yield from limited_stream(
                    self.api, open_stream, deadline=deadline, action=action, image=reference
                )


def _auth(auth: Mapping[str, str] | None) -> dict[str, str] | None:
    # None lets docker-py send what ~/.docker/config.json holds (docker login).
    return dict(auth) if auth else None
