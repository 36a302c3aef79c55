"""BuildKit cache mounts: find them in a Dockerfile, copy them out of a builder and back in.

BuildKit keys a cache mount (``RUN --mount=type=cache``) by its ``id``, the target path
when none is given, and, when ``uid``, ``gid`` or ``mode`` are set, by the small folder
it first creates with them ("settings cache mount permissions"), a build step cached
like any other. A generated Dockerfile whose RUN names the same id with the same
uid/gid/mode therefore reaches the very cache the project's build uses, whatever its
base image (the "cache dance"):

- out, after a build: ``cp -a`` the mount into a stage that ``--output type=tar`` sends to
  us (BuildKit writes the tar in a fixed order, so unchanged contents give the same
  digest);
- in, before a build: ``cp -a`` from a seed image (the saved tar, imported) bind-mounted
  beside the mount, unless the mount already holds something (this builder kept it).

Each generated RUN carries a nonce so that BuildKit runs it instead of answering it from
its cache. ``--no-cache`` would not do: it also recreates that permissions folder, and
with it reaches another cache. The base image must have ``sh``, ``cp``, ``find`` and
``ls`` (the project's own RUN steps need a shell in it too); ``scratch`` stages are left
out. The classic builder has no cache mounts.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from layerkeep.building.dockerfile import Stage, expand, parse_dockerfile, root_stage
from layerkeep.core.errors import BuildFailed

CHUNK = 1 << 20
# What an export of an empty mount is: a tar with no member, just its two zero blocks.
EMPTY_TAR = 1024
_OPTIONS = ("uid", "gid", "mode")
_SHARING = ("shared", "private", "locked")
# Inside the generated builds: where the mount, the seed and the results are.
_MOUNT = "/layerkeep-cache-mount"
_SEED = "/layerkeep-seed"
_OUT = "/layerkeep-out"


@dataclass(frozen=True)
class CacheMount:
    """One cache of the Dockerfile: its id, where the project mounts it, and how.

    ``base`` is the image the generated builds run in (the stage's base, followed
    through stage names); ``options`` are its uid/gid/mode as written.
    """

    id: str
    target: str
    base: str
    sharing: str = "shared"
    options: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Which BuildKit cache this is: the id, and the options that pick its folder."""
        return ",".join([self.id, *self.options])

    def spec(self, target: str) -> str:
        """The ``--mount`` value that reaches this cache at ``target``."""
        return ",".join(
            [f"type=cache,id={self.id},target={target},sharing={self.sharing}", *self.options]
        )


@dataclass(frozen=True)
class Found:
    """The cache mounts of a Dockerfile, one per cache, and the lines about those left out."""

    mounts: tuple[CacheMount, ...]
    notes: tuple[str, ...]


def find_cache_mounts(text: str, build_args: Mapping[str, str]) -> Found:
    """Every ``RUN --mount=type=cache`` of a Dockerfile, first use of each cache first.

    Left out, with a note each: a mount seeded ``from=`` another image (BuildKit keys it
    by that image too), one whose id or target uses a variable, one in a stage that
    comes from ``scratch`` or from an image named by a variable the build args and
    global ``ARG`` defaults do not give.
    """
    dockerfile = parse_dockerfile(text)
    values = {**dockerfile.global_args, **build_args}
    mounts: dict[str, CacheMount] = {}
    notes: list[str] = []
    for stage in dockerfile.stages:
        for instruction in stage.instructions:
            for fields in instruction.mounts():
                if fields.get("type") != "cache":
                    continue
                mount, note = _cache_mount(fields, dockerfile.stages, stage.index, values)
                if mount is None:
                    notes.append(note)
                else:
                    mounts.setdefault(mount.key, mount)
    return Found(tuple(mounts.values()), tuple(notes))


def _cache_mount(
    fields: Mapping[str, str],
    stages: Sequence[Stage],
    index: int,
    values: Mapping[str, str | None],
) -> tuple[CacheMount | None, str]:
    target = fields.get("target") or fields.get("dst") or fields.get("destination") or ""
    cache_id = fields.get("id") or target
    where = f"cache mount {cache_id or '?'} (stage {stages[index].name or index})"
    if "from" in fields:
        return None, f"{where} is seeded from {fields['from']}: not kept"
    if not target or any(char in cache_id + target for char in '$,"'):
        return None, f"{where}: its id or target is not a plain path: not kept"
    base = expand(root_stage(stages, index).base, values)
    if base.lower() == "scratch" or "$" in base or not base:
        return None, f"{where}: its stage comes from scratch or an unknown image: not kept"
    sharing = fields.get("sharing", "shared") or "shared"
    if sharing not in _SHARING:
        return None, f"{where}: sharing={sharing} is not one BuildKit knows: not kept"
    options = tuple(f"{name}={fields[name]}" for name in _OPTIONS if name in fields)
    return CacheMount(cache_id, target, base, sharing, options), ""


# --- the generated builds --------------------------------------------------------------


def export_mount(
    cli: str, environ: Mapping[str, str], mount: CacheMount, output: IO[bytes]
) -> tuple[str, int]:
    """Write the mount's contents into ``output`` as a tar; return its sha256 and size.

    An empty mount gives an EMPTY_TAR-byte tar.
    """
    dockerfile = (
        f"FROM {mount.base} AS dance\n"
        f"RUN --mount={mount.spec(_MOUNT)} mkdir {_OUT} && cp -a {_MOUNT}/. {_OUT}/"
        f" && : {_nonce()}\n"
        "FROM scratch\n"
        f"COPY --from=dance {_OUT} /\n"
    )
    digest = hashlib.sha256()
    size = 0

    def take(stream: IO[bytes]) -> None:
        nonlocal size
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            output.write(chunk)

    _run(cli, environ, dockerfile, take, what=f"export of cache mount {mount.id}")
    return f"sha256:{digest.hexdigest()}", size


def import_mount(cli: str, environ: Mapping[str, str], mount: CacheMount, seed: str) -> bool:
    """Copy the files of the image ``seed`` into the mount, if it is empty.

    Returns False when the mount already held something (this builder kept it): its
    contents are left as they are, being at least as new as any saved copy.
    """
    script = (
        f"mkdir {_OUT} && if [ -n \"$(ls -A {_MOUNT})\" ]; then echo kept > {_OUT}/status; "
        f"else find {_SEED} -mindepth 1 -maxdepth 1 -exec cp -a {{}} {_MOUNT}/ \\; "
        f"&& echo restored > {_OUT}/status; fi && : {_nonce()}"
    )
    dockerfile = (
        f"FROM {mount.base} AS dance\n"
        f"RUN --mount={mount.spec(_MOUNT)} --mount=type=bind,from={seed},target={_SEED} "
        f"{script}\n"
        "FROM scratch\n"
        f"COPY --from=dance {_OUT} /\n"
    )
    status = io.BytesIO()
    _run(
        cli, environ, dockerfile, lambda stream: status.write(stream.read()),
        what=f"restore of cache mount {mount.id}",
    )
    status.seek(0)
    with tarfile.open(fileobj=status) as archive:
        content = archive.extractfile("status")
        return content is not None and content.read().strip() == b"restored"


def _nonce() -> str:
    return os.urandom(8).hex()


def _run(
    cli: str,
    environ: Mapping[str, str],
    dockerfile: str,
    take: Callable[[IO[bytes]], object],
    *,
    what: str,
) -> None:
    """Build ``dockerfile`` from an empty context with BuildKit; ``take`` reads the tar."""
    env = {**environ, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"}
    with tempfile.TemporaryDirectory(prefix="layerkeep-dance-") as folder:
        (Path(folder) / "Dockerfile").write_text(dockerfile)
        log = Path(folder) / "build.log"
        with log.open("w+b") as errors:
            command = [cli, "build", "--progress=plain", "--output", "type=tar,dest=-", folder]
            with subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=errors
            ) as process:
                assert process.stdout is not None
                take(process.stdout)
                process.stdout.read()  # whatever take left, so the CLI can finish
            errors.seek(0)
            lines = errors.read().decode(errors="replace").splitlines()
            tail = deque(lines, maxlen=BuildFailed.TAIL_LINES)
    if process.returncode != 0:
        raise BuildFailed.from_output(what, image=what, exit_code=process.returncode, tail=tail)
