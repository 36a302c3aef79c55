"""Stand-ins for official images, built from Debian packages on machines that cannot pull.

Each stand-in is tagged with the official name, so a user's configuration stays the same:

==========================  ====================================================
image                       also tagged
==========================  ====================================================
``debian:bookworm-slim``    ``debian:12-slim``
``python:3.11-slim``        ``python:3.11-slim-bookworm``, ``python:3.11``
``postgres:15``             ``postgres:15-bookworm``
``redis:7``                 ``redis:7-bookworm``, ``redis:7.0``
``registry:2``              ``registry:2.8``
==========================  ====================================================

``latest`` tags are left alone: the official ones name newer majors (postgres 17+,
registry 3) than Debian bookworm ships. ``python:3.11`` is the slim stand-in, without
the full image's compilers.

The base is ``mmdebstrap --variant=minbase`` piped into an image import; the others are
ordinary builds of the Dockerfiles in ``dockerfiles/<folder>/``. They differ from the
official images where Debian does: Debian's python 3.11.2 installs into dist-packages,
postgres uses the C.UTF-8 locale, redis is 7.0. The python stand-in carries the host's CA
bundle so that ``pip install`` works in ``docker build`` behind a TLS-intercepting proxy.

Every stand-in carries the label ``io.layerkeep.standin=1`` (which images built from them
inherit) and ``io.layerkeep.standin.image=<reference>``, which is what marks a tag as ours:
a present image without it, such as a real pulled one, is never replaced.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError, ResourceConflict
from layerkeep.core.log import Log

STANDIN_LABEL = "io.layerkeep.standin"
STANDIN_IMAGE_LABEL = "io.layerkeep.standin.image"
BASE = "debian:bookworm-slim"
IMAGES_DIR = Path(__file__).parent / "dockerfiles"
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_BUNDLE_NAME = "host-ca-bundle.crt"
BASE_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# A service build's longest silence (apt unpacking postgresql) is well under this.
BUILD_TIMEOUT = 900
_PIPE_CHUNK = 1 << 20
_LAST_LINES = 15
_NETWORK_FAILURES = (
    "Failed to fetch",
    "Could not resolve",
    "Could not connect",
    "Temporary failure",
)


@dataclass(frozen=True)
class Standin:
    """One stand-in image: its official reference, recipe folder and extra tags."""

    reference: str
    folder: str
    provides: str
    aliases: tuple[str, ...] = ()
    needs_ca_bundle: bool = False


STANDINS: dict[str, Standin] = {
    s.reference: s
    for s in (
        Standin(BASE, "debian", "Debian 12 minbase, docker-style trimmed", ("debian:12-slim",)),
        Standin(
            "python:3.11-slim",
            "python",
            "python3 3.11, pip, venv; the host's CA bundle",
            ("python:3.11-slim-bookworm", "python:3.11"),
            needs_ca_bundle=True,
        ),
        Standin(
            "postgres:15",
            "postgres",
            "PostgreSQL 15 with the official image's entrypoint variables",
            ("postgres:15-bookworm",),
        ),
        Standin(
            "redis:7",
            "redis",
            "redis-server 7.0, reachable from other containers",
            ("redis:7-bookworm", "redis:7.0"),
        ),
        Standin("registry:2", "registry", "Docker Distribution 2.8 on :5000", ("registry:2.8",)),
    )
}


def ensure_standins(
    engine: Engine,
    *,
    names: Sequence[str] | None = None,
    force: bool = False,
    log: Log = print,
    ca_bundle: Path = DEFAULT_CA_BUNDLE,
) -> list[str]:
    """Build the stand-ins the engine lacks (all, or ``names``); return those built.

    ``names`` may use aliases. ``force`` rebuilds stand-ins that are present, without the
    build cache (so Debian updates come in), but never replaces an image not of ours. The
    base is built first whenever a service image is to be built and the engine lacks it.
    """
    wanted = _resolve(names)
    plan: list[Standin] = []
    for standin in wanted:
        attrs = engine.image_attrs(standin.reference)
        if attrs is None or (force and _is_ours(attrs, standin)):
            plan.append(standin)
        elif not _is_ours(attrs, standin):
            log(f"{standin.reference}: present, not a stand-in (left alone)")
        else:
            _tag_aliases(engine, standin, str(attrs["Id"]))
            log(f"{standin.reference}: already present")
    base = STANDINS[BASE]
    if base not in plan and any(s is not base for s in plan) and engine.image_id(BASE) is None:
        plan.insert(0, base)

    if base in plan:
        # Fail before building anything when the base cannot be made.
        _mmdebstrap_path()
    if any(s.needs_ca_bundle for s in plan) and not ca_bundle.is_file():
        raise DockerOperationError(
            f"cannot build the python stand-in: no CA bundle at {ca_bundle}",
            image=next(s.reference for s in plan if s.needs_ca_bundle),
            hint="apt-get install ca-certificates, or pass the bundle the host trusts",
        )

    built: list[str] = []
    for standin in plan:
        started = time.monotonic()
        previous = engine.image_id(standin.reference)
        if standin is base:
            image_id = build_base(engine, standin.reference, IMAGES_DIR / standin.folder)
        else:
            image_id = _build_service(engine, standin, ca_bundle, fresh=force)
        _tag_aliases(engine, standin, image_id, replace=True)
        if previous is not None and previous != image_id:
            _remove_if_unused(engine, previous)
        built.append(standin.reference)
        size_mb = _size_mb(engine, image_id)
        log(f"{standin.reference}: built in {time.monotonic() - started:.0f} s ({size_mb} MB)")
    return built


def build_base(
    engine: Engine,
    reference: str,
    files: Path,
    *,
    sources: Sequence[str] = BASE_SOURCES,
) -> str:
    """Bootstrap Debian with mmdebstrap, import it as ``reference``, return the image id.

    The tarball streams from mmdebstrap into the engine. The import is tagged only after
    mmdebstrap has exited cleanly, so a failed bootstrap never leaves a half image behind
    the official name.
    """
    command = [
        str(_mmdebstrap_path()),
        "--variant=minbase",
        "--format=tar",
        f"--hook-dir={MERGED_USR_HOOKS}",
        f"--dpkgopt={files / 'dpkg-trim.cfg'}",
        f"--aptopt={files / 'apt-docker.conf'}",
        # mmdebstrap deletes whatever policy-rc.d exists when it finishes, unless it is
        # told the file is ours. Special hooks drop the file mode, hence the chmod.
        "--skip=chroot/policy-rc.d",
        _hook("--essential-hook", "upload", files / "policy-rc.d", "/usr/sbin/policy-rc.d"),
        '--essential-hook=chroot "$1" chmod 0755 /usr/sbin/policy-rc.d',
        # mmdebstrap's own apt cleanup runs after the customize hooks and with the
        # chroot's apt configuration, where docker-clean's commands would run on the
        # host and its empty Dir::Cache settings would keep the caches: clean inside
        # the chroot instead, then install docker-clean last.
        "--skip=cleanup/apt",
        '--customize-hook=chroot "$1" apt-get -o Dir::Etc::SourceList=/dev/null'
        " -o Dir::Etc::SourceParts=/dev/null update",
        '--customize-hook=chroot "$1" apt-get clean',
        _hook(
            "--customize-hook", "upload", files / "docker-clean", "/etc/apt/apt.conf.d/docker-clean"
        ),
        "bookworm",
        "-",
        *sources,
    ]
    changes = [
        'CMD ["bash"]',
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        *(f"LABEL {key}={value}" for key, value in _labels(reference).items()),
    ]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        import_error: DockerOperationError | None = None
        image_id: str | None = None
        try:
            try:
                image_id = engine.import_image(
                    _chunks(process.stdout), reference=reference, changes=changes
                )
            except DockerOperationError as error:
                import_error = error
            finally:
                process.stdout.close()
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode != 0:
            if image_id is not None:
                _remove_if_unused(engine, image_id)
            reason, unreachable = _mmdebstrap_reason(stderr)
            also = f" (and {import_error.message})" if import_error else ""
            raise DockerOperationError(
                f"building {reference}: mmdebstrap failed: {reason}{also}",
                image=reference,
                hint=_mmdebstrap_hint(unreachable=unreachable),
            )
    if import_error is not None:
        raise import_error
    assert image_id is not None
    engine.tag_image(image_id, reference)
    return image_id


def _build_service(engine: Engine, standin: Standin, ca_bundle: Path, *, fresh: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="layerkeep-standin-") as scratch:
        context = Path(scratch) / standin.folder
        shutil.copytree(IMAGES_DIR / standin.folder, context)
        if standin.needs_ca_bundle:
            shutil.copyfile(ca_bundle, context / CA_BUNDLE_NAME)
        return engine.build(
            context, tag=standin.reference, labels=_labels(standin.reference), nocache=fresh
        )


def _resolve(names: Sequence[str] | None) -> list[Standin]:
    if names is None:
        return list(STANDINS.values())
    by_name = {alias: s for s in STANDINS.values() for alias in (s.reference, *s.aliases)}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ConfigError(
            f"no stand-in for {', '.join(unknown)}",
            key="names",
            hint=f"known: {', '.join(STANDINS)}",
        )
    wanted = {by_name[name].reference for name in names}
    return [s for s in STANDINS.values() if s.reference in wanted]


def _labels(reference: str) -> dict[str, str]:
    return {STANDIN_LABEL: "1", STANDIN_IMAGE_LABEL: reference}


def _is_ours(attrs: dict[str, Any], standin: Standin) -> bool:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(STANDIN_IMAGE_LABEL) == standin.reference)


def _tag_aliases(engine: Engine, standin: Standin, image_id: str, *, replace: bool = False) -> None:
    """Point the aliases at ``image_id``, never moving one that names a foreign image."""
    for alias in standin.aliases:
        attrs = engine.image_attrs(alias)
        if attrs is not None and (not replace or not _is_ours(attrs, standin)):
            continue
        engine.tag_image(image_id, alias)


def _remove_if_unused(engine: Engine, image_id: str) -> None:
    # A conflict: still tagged, used by a container, or the parent of other images; an
    # old base under service images built from it is expected and must stay.
    with contextlib.suppress(ResourceConflict):
        engine.remove_image(image_id)


def _size_mb(engine: Engine, image_id: str) -> int:
    attrs = engine.image_attrs(image_id) or {}
    return round(int(attrs.get("Size", 0)) / 1_000_000)


def _mmdebstrap_path() -> Path:
    found = shutil.which("mmdebstrap")
    if found is None:
        raise DockerOperationError(
            f"cannot build {BASE}: mmdebstrap is not installed",
            image=BASE,
            hint="apt-get install mmdebstrap",
        )
    if not MERGED_USR_HOOKS.is_dir():
        raise DockerOperationError(
            f"cannot build {BASE}: mmdebstrap has no hook directory {MERGED_USR_HOOKS}",
            image=BASE,
            hint="install mmdebstrap 1.x from Debian 12 or later",
        )
    return Path(found)


def _hook(option: str, command: str, *paths: Path | str) -> str:
    # mmdebstrap splits special hooks with Text::ParseWords, which reads shlex quoting.
    return f"{option}=" + " ".join([command, *(shlex.quote(str(p)) for p in paths)])


def _chunks(pipe: IO[bytes]) -> Iterator[bytes]:
    while chunk := pipe.read(_PIPE_CHUNK):
        yield chunk


def _mmdebstrap_hint(*, unreachable: bool) -> str:
    """What to do about a failed bootstrap: the network, or a user who is not root."""
    if unreachable:
        return "the Debian mirror is unreachable: check HTTP access to it from here"
    if os.geteuid() != 0:
        return (
            "mmdebstrap builds the base image as root (its chroot mode): run "
            "`inv standins.build` as root once, or pull debian:bookworm-slim"
        )
    return ""


def _mmdebstrap_reason(stderr: IO[bytes]) -> tuple[str, bool]:
    """The line of mmdebstrap's output that says why it failed, and whether it is the network."""
    stderr.seek(0)
    lines = [line.strip() for line in stderr.read().decode(errors="replace").splitlines()]
    for marker in _NETWORK_FAILURES:
        for line in lines:
            if marker in line:
                return line.removeprefix("W: ").removeprefix("E: "), True
    errors = [line for line in lines if line.startswith("E: ")]
    if errors:
        return errors[0].removeprefix("E: "), False
    return next((line for line in reversed(lines) if line), "no output"), False
