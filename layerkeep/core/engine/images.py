"""The engine's local images: build, inspect, name, import, remove; and what names their
content on either image store."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions

from layerkeep.core.engine.connection import Connection
from layerkeep.core.engine.context_archive import context_archive
from layerkeep.core.engine.translation import (
    checked_stream,
    first_line,
    translate,
    translated,
)
from layerkeep.core.errors import (
    BuildFailed,
    DockerOperationError,
    ResourceNotFound,
)

# A build's longest silence (apt unpacking postgresql, pip compiling) is well under this.
BUILD_TIMEOUT = 900
_LAST_LINES = 20
# docker-py's connection pool holds ten connections.
_INSPECT_THREADS = 8


def image_layers(attrs: Mapping[str, Any]) -> tuple[str, ...]:
    """The diff ids of an image's layers, bottom first, from its inspect record."""
    return tuple(str(digest) for digest in (attrs.get("RootFS") or {}).get("Layers") or [])


def image_content(attrs: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """What names one image on either image store, where its ids differ (the classic
    store's is its config's digest, the containerd store's its manifest's): its layers
    and creation time, from its inspect record."""
    return image_layers(attrs), str(attrs.get("Created", ""))


def repository_and_tag(reference: str) -> tuple[str, str]:
    """``repository:tag`` as its two parts; no tag (a registry port is not one) is latest."""
    repository, _, tag = reference.rpartition(":")
    if "/" in tag or not repository:
        return reference, "latest"
    return repository, tag


class ImageCalls(Connection):
    """The Engine's calls on local images."""

    def image_id(self, reference: str) -> str | None:
        """The id of a local image, or None when the engine lacks it."""
        attrs = self.image_attrs(reference)
        return None if attrs is None else str(attrs["Id"])

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
        name, archive = context_archive(context, dockerfile, exclude)
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
                f"build {tag} failed: {first_line(error)}", image=tag, last_lines=list(tail)
            ) from None
        finally:
            archive.close()
        found = self.image_id(tag)
        if found is None or (built is not None and found != built):
            raise BuildFailed(
                f"build {tag} ended without tagging an image", image=tag, last_lines=list(tail)
            )
        return found

    def tag_image(self, image: str, reference: str) -> None:
        """Give ``image`` (a name or id) the name ``reference`` (``repository:tag``)."""
        repository, tag = repository_and_tag(reference)
        with translated(f"tag {image} as {reference}", resource=image, image=reference):
            self.api.tag(image, repository, tag)

    def remove_image(self, image: str, *, prune: bool = True, force: bool = False) -> bool:
        """Remove a name (or the image by id); False when it was already gone.

        ``prune`` also removes untagged parents; an image still in use raises
        ResourceConflict.
        """
        try:
            with translated(f"remove image {image}", resource=image, image=image):
                self.api.remove_image(image, force=force, noprune=not prune)
        except ResourceNotFound:
            return False
        return True

    def import_image(
        self, chunks: Iterable[bytes], *, reference: str, changes: Sequence[str]
    ) -> str:
        """Import a root filesystem tar stream as an untagged image; return its id."""
        with translated(f"import of {reference}", image=reference):
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

    def local_images(self) -> list[dict[str, Any]]:
        """The inspect record of every local image (intermediate ones included)."""
        with translated("list images"):
            summaries = self.api.images(all=True)
        # One inspect per image, a few at a time: an engine with a hundred images answers
        # in a tenth of the time it takes one by one.
        with ThreadPoolExecutor(max_workers=_INSPECT_THREADS) as pool:
            found = list(pool.map(self.image_attrs, [str(s["Id"]) for s in summaries]))
        return [attrs for attrs in found if attrs is not None]

    def uses_containerd_store(self) -> bool:
        """Whether images live in containerd's image store (Docker 29's default)."""
        with translated("ask the engine its storage driver"):
            info = self.api.info()
        return any(
            "containerd.snapshotter" in str(value) for _, value in info.get("DriverStatus") or []
        )

    def layers_size(self) -> int | None:
        """The bytes every image layer of the engine takes on disk; None when the engine is
        busy with another disk-usage query (a figure, which must never fail a job).

        Docker before 23 answers one such query at a time and fails the others (500, "a
        disk usage operation is already running"): another job's build asks too.
        """
        try:
            with translated("ask the engine its disk usage"):
                return int(self.api.df().get("LayersSize") or 0)
        except DockerOperationError as error:
            if "a disk usage operation is already running" in error.message:
                return None
            raise

    def build_cache_entries(self) -> int | None:
        """What the engine could reuse without any cached image: BuildKit's cache records
        plus images the classic builder made here (they have a parent).

        None when the engine cannot tell right now (it answers one disk-usage query at a
        time: another build's asks first): a figure for the build line, never a failure.
        """
        try:
            with translated("ask the engine about its build cache"):
                usage = self.api.df()
                summaries = self.api.images(all=True)
        except DockerOperationError:
            return None
        built_here = sum(1 for summary in summaries if summary.get("ParentId"))
        return len(usage.get("BuildCache") or []) + built_here
