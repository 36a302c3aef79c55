"""The settings, each declared once: a field of :class:`Settings` made with :func:`setting`.

A declaration holds a setting's default text, its one-line meaning, its parser and, for a
few, the task flag that sets it for one command; ``heading=`` opens a section of the
settings reference (docs/settings.md) that runs to the next heading. The key list
(:data:`KEYS`), the task flags (:data:`FLAGS`), the loader, the ``.env.example`` check,
the settings view and the reference all derive from these declarations.

This module is one job, declaring the settings, and stays one file as it passes 450
lines: a setting is one field, and its sections (``heading=``) keep it readable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Protocol, get_type_hints

from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.secrets import Masker
from layerkeep.core.service_specs import ServiceSpec
from layerkeep.core.settings import parsers
from layerkeep.core.settings.parsers import (
    Builder,
    BuildSecret,
    CacheBackend,
    Compression,
    Mount,
    ReadOnly,
)

PREFIX = "LAYERKEEP_"


@dataclass(frozen=True)
class Declaration:
    """A setting as declared on its Settings field (see :func:`setting`)."""

    default: str
    doc: str
    parse: Callable[[str, Path], object]
    secret: bool
    flag: str
    heading: str


def setting(
    default: str,
    doc: str,
    parse: Callable[[str, Path], object] = parsers.text,
    *,
    secret: bool = False,
    flag: str = "",
    heading: str = "",
) -> Declaration:
    """Declare a Settings field, ``x: Annotated[T, setting(...)]``, as ``LAYERKEEP_<X>``.

    ``default`` is the text used when nothing sets it, ``doc`` one line for listings,
    ``parse`` turns text into the field's value; a secret's value is never shown.
    ``flag`` (e.g. ``"--cache-dir"``) is the task flag that sets it for one command:
    tasks name the flags they take, and their help text comes from ``doc``.
    ``heading`` starts a section of the reference here, titled so.
    """
    return Declaration(default, doc, parse, secret, flag, heading)


class Resolvable(Protocol):
    """What settings were resolved from (the loader's record), to resolve them again."""

    def with_flags(self, flags: Mapping[str, str]) -> Settings:
        """The settings resolved again with task flags (field name -> text) on top."""
        ...


@dataclass(frozen=True)
class Settings:
    """Everything the tasks need, resolved and validated.

    Build it with :func:`load_settings`; flags go on top with :meth:`with_flags`.
    """

    project_dir: Path
    # Values never to print, longest first (see secret_values.collect).
    secret_values: tuple[str, ...] = field(repr=False)
    # The env files that existed and were read, lowest precedence first.
    env_files: tuple[Path, ...]
    # Where each LAYERKEEP_* value came from: default, file:line, environment, flag --x.
    origins: Mapping[str, str] = field(compare=False, repr=False)
    # What this was resolved from, so that flags resolve everything again on top.
    _inputs: Resolvable = field(compare=False, repr=False)

    project: Annotated[
        str,
        setting(
            "", "Project name used in labels; default: the folder's name.",
            heading="The project and its image (image.build)",
        ),
    ]
    image: Annotated[
        ImageRef | None,
        setting(
            "", "Repository (and optional tag) of the app image.", parsers.image, flag="--image"
        ),
    ]
    context: Annotated[
        Path, setting(".", "Build context folder, relative to the project.", parsers.folder)
    ]
    dockerfile: Annotated[
        Path, setting("Dockerfile", "Dockerfile, relative to the context.", parsers.path)
    ]
    build_args: Annotated[
        Mapping[str, str],
        setting("", "Build arguments: comma-separated NAME=value.", parsers.build_args),
    ]
    build_secrets: Annotated[
        tuple[BuildSecret, ...],
        setting(
            "", "BuildKit secrets: environment variables (VARIABLE or id=VARIABLE), "
            "comma-separated.", parsers.build_secrets,
        ),
    ]
    builder: Annotated[
        Builder,
        setting(
            "auto", "auto (BuildKit if it works), legacy or buildkit.",
            parsers.one_of(parsers.BUILDERS), flag="--builder",
        ),
    ]
    docker_cli: Annotated[
        str, setting("", "docker CLI for BuildKit builds; default: one that works.")
    ]
    docker_timeout: Annotated[
        int, setting("120", "Seconds per Docker API call.", parsers.whole_number(1, 3600))
    ]

    cache_dir: Annotated[
        Path,
        setting(
            ".layerkeep-cache", "Folder holding the layer cache (relative or absolute).",
            parsers.folder, flag="--cache-dir",
            heading="The layer cache (cache.load, cache.save)",
        ),
    ]
    layer_compression: Annotated[
        Compression,
        setting(
            "zstd", "Layers of the image and of BuildKit's cache, where BuildKit exports it: "
            "zstd, or gzip for pullers older than Docker 23.", parsers.one_of(parsers.COMPRESSIONS),
        ),
    ]
    cache_images: Annotated[
        tuple[str, ...], setting("", "More images to cache, comma-separated.", parsers.images)
    ]
    cache_level: Annotated[
        int, setting("3", "zstd level of cached layers.", parsers.whole_number(1, 19))
    ]
    cache_threads: Annotated[
        int,
        setting(
            "0", "zstd threads compressing cached layers; 0: one per core, at most 4.",
            parsers.whole_number(0, 64),
        ),
    ]

    build_id: Annotated[
        str,
        setting(
            "", "Id of this CI job; default: from the CI's variables, else 'local'.",
            parsers.build_id, heading="The job (default: from the CI's variables)",
        ),
    ]
    commit: Annotated[str, setting("", "Commit SHA; default: the CI's own variable, else git.")]
    branch: Annotated[str, setting("", "Branch name; default: the CI's own variable, else git.")]
    pull_request: Annotated[
        bool,
        setting(
            "", "Whether this job builds a pull/merge request; default: the CI's variables.",
            parsers.yes_no_or_unset,
        ),
    ]

    # Parsed to names here; the loader then builds each service from its own keys.
    services: Annotated[
        tuple[ServiceSpec, ...],
        setting(
            "", "Service containers, e.g. postgres,redis.", parsers.service_names,
            heading="Services (services.up, services.down, services.sweep)",
        ),
    ]
    sweep_after: Annotated[
        int,
        setting(
            "3600", "services.sweep removes leftovers older than this (s).",
            parsers.whole_number(0, 10**7), flag="--older-than",
        ),
    ]

    db_service: Annotated[
        str,
        setting(
            "postgres", "The postgres service db.init prepares.", heading="Database (db.init)"
        ),
    ]
    db_name: Annotated[str, setting("app_test", "Database db.init creates if missing.")]
    db_user: Annotated[
        str, setting("postgres", "Database user (the postgres service's superuser).")
    ]
    db_password: Annotated[
        str, setting("layerkeep", "Its password; never printed.", secret=True)
    ]
    db_init_sql: Annotated[
        tuple[Path, ...], setting("", "SQL files db.init runs, comma-separated.", parsers.files)
    ]
    db_init_command: Annotated[str, setting("", "Command db.init runs in the app image.")]

    test_command: Annotated[
        str,
        setting(
            "python -m pytest --junitxml=/reports/junit.xml", "Test command run in the app image.",
            heading="Tests (test.run)",
        ),
    ]
    test_env: Annotated[
        Mapping[str, str],
        setting("", "Test environment: NAME={service.fact} templates.", parsers.pairs),
    ]
    test_mounts: Annotated[
        tuple[Mount, ...],
        setting("", "host-file-or-folder:/container/path[:ro], comma-separated.", parsers.mounts),
    ]
    test_setup: Annotated[str, setting("", "Shell commands run before the tests, same container.")]
    test_workdir: Annotated[
        str, setting("", "Working directory for the tests; default: the image's.")
    ]
    test_files: Annotated[
        tuple[str, ...],
        setting(
            "", "Test files to split between nodes: globs relative to the project, "
            "comma-separated.", parsers.items,
        ),
    ]
    test_nodes: Annotated[
        int,
        setting(
            "1", "Test containers run at once on this machine, each with its share of "
            "LAYERKEEP_TEST_FILES.", parsers.whole_number(1, 16), flag="--nodes",
        ),
    ]
    node_index: Annotated[
        int,
        setting(
            "", "This CI node's number, from 1; default: the CI's, else 1.", parsers.node_number
        ),
    ]
    node_total: Annotated[
        int,
        setting(
            "", "How many CI nodes share the tests; default: the CI's, else 1.",
            parsers.node_number,
        ),
    ]
    reports_dir: Annotated[
        Path,
        setting("", "JUnit XML folder; default: the CI's, or reports.", parsers.optional_folder),
    ]
    keep_services: Annotated[
        bool,
        setting(
            "no", "Keep services after test.run, for debugging.", parsers.yes_no,
            flag="--keep-services",
        ),
    ]
    skip_dependencies: Annotated[
        bool,
        setting(
            "no",
            "Run only the tasks named on the command line, not their pre/post tasks.",
            parsers.yes_no,
        ),
    ]
    secrets: Annotated[
        tuple[str, ...],
        setting(
            "", "Variables whose values are never printed, comma-separated names.",
            parsers.variable_names,
        ),
    ]

    registry: Annotated[
        str,
        setting(
            "", "Registry to release to (host[:port]); empty: no release.", parsers.registry,
            heading="Release (release.push)",
        ),
    ]
    registry_user: Annotated[str, setting("", "Registry user; empty: an existing docker login.")]
    registry_password: Annotated[
        str, setting("", "Registry password or token; never printed.", secret=True)
    ]
    release_branches: Annotated[
        tuple[str, ...], setting("*", "Branches release.push pushes (globs).", parsers.items)
    ]
    release_latest_branch: Annotated[str, setting("", "Branch whose pushes also get :latest.")]
    release_tags: Annotated[
        tuple[str, ...],
        setting("", "More tags; {git_tag} is the tag at HEAD, if any.", parsers.items),
    ]
    push_retries: Annotated[
        int,
        setting(
            "3", "Attempts per registry call on transient failures.", parsers.whole_number(1, 10)
        ),
    ]
    push_timeout: Annotated[
        int,
        setting(
            "300", "Seconds a push or pull may take in all, retries included.",
            parsers.whole_number(1, 86400),
        ),
    ]

    cache_backend: Annotated[
        CacheBackend,
        setting(
            "dir", "dir (LAYERKEEP_CACHE_DIR) or registry.",
            parsers.one_of(parsers.CACHE_BACKENDS), flag="--backend",
            heading="Sharing the cache between machines",
        ),
    ]
    cache_repository: Annotated[
        str, setting("", "Registry repository for cache tags (registry backend).")
    ]
    cache_fallback_branch: Annotated[
        str,
        setting(
            "", "Branch whose registry cache a branch without one loads; default: CI's, or main."
        ),
    ]
    cache_read_only: Annotated[
        ReadOnly,
        setting(
            "no", "yes: never push to the registry cache; auto: not on pull requests.",
            parsers.one_of(parsers.READ_ONLY),
        ),
    ]
    cache_mounts: Annotated[
        bool,
        setting(
            "yes", "Keep BuildKit cache mounts (RUN --mount=type=cache) in the cache.",
            parsers.yes_no,
        ),
    ]
    cache_mounts_max: Annotated[
        int,
        setting(
            "2GB", "Most cache-mount content kept (least recently saved dropped first).",
            parsers.size,
        ),
    ]
    cache_max_mb: Annotated[
        int,
        setting(
            "0", "Most MB the cache folder holds; cache.save drops least recently used "
            "first (0: no limit).", parsers.whole_number(0, 10**9), flag="--max-mb",
        ),
    ]
    cache_prune_days: Annotated[
        int,
        setting(
            "14", "cache.prune removes registry scopes not saved for this many days.",
            parsers.whole_number(1, 36500),
        ),
    ]

    def __repr__(self) -> str:
        # Secret settings stay out; pairs such as test_env may hold secrets: masked.
        secret = {key.field for key in KEYS if key.secret}
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.repr and f.name not in secret
        )
        return self.masker.mask(f"Settings({shown})")

    @property
    def masker(self) -> Masker:
        """Masks every secret these settings found, and the registry login as Basic auth."""
        return Masker.of(
            self.secret_values, logins=[(self.registry_user, self.registry_password)]
        )

    def require_image(self) -> ImageRef:
        """The app image, or a one-line error saying how to set it."""
        if self.image is None:
            raise ConfigError(
                "LAYERKEEP_IMAGE is not set",
                key="LAYERKEEP_IMAGE",
                hint="set it in layerkeep.env or .env, e.g. LAYERKEEP_IMAGE=myorg/app, "
                "or pass --image",
            )
        return self.image

    def with_flags(self, **flags: str | None) -> Settings:
        """A copy with task flags on top (None or "" means "not given"), by field name.

        Everything derived is resolved again, and ``origins`` names the flag (the declared
        one, e.g. ``flag --backend`` for ``cache_backend``).
        """
        given = {name: value for name, value in flags.items() if value}
        return self._inputs.with_flags(given) if given else self


@dataclass(frozen=True)
class Key:
    """One declared setting, as listings and the loader see it."""

    name: str
    field: str
    default: str
    doc: str
    parse: Callable[[str, Path], object]
    secret: bool
    # The task flag that sets it for one command ("--cache-dir"), or "" for none.
    flag: str = ""
    # Whether the setting is yes/no, so that its flag is a switch (--keep-services).
    switch: bool = False
    # The title of the reference's section it stands in (the nearest heading above it).
    section: str = ""

    @property
    def param(self) -> str:
        """The flag's name as a task parameter: ``--cache-dir`` is ``cache_dir``."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def flag_help(self) -> str:
        """The flag's help text, from the setting's own doc: declared once."""
        return f"{self.doc.rstrip('.')}; sets {self.name} for every task of the command"

    def flag_text(self, value: object) -> str | None:
        """A flag's parsed value as a setting's text; None when the flag was not given."""
        if value is None or value is False or value == "":
            return None
        return "yes" if value is True else str(value)


def _declared() -> tuple[Key, ...]:
    hints = get_type_hints(Settings, include_extras=True)
    keys: list[Key] = []
    section = ""
    for each in fields(Settings):
        for d in getattr(hints[each.name], "__metadata__", ()):
            if isinstance(d, Declaration):
                name = f"{PREFIX}{each.name.upper()}"
                switch = hints[each.name].__origin__ is bool
                section = d.heading or section
                keys.append(
                    Key(name, each.name, d.default, d.doc, d.parse, d.secret, d.flag, switch,
                        section)
                )
    return tuple(keys)


KEYS = _declared()
KNOWN = {key.name: key for key in KEYS}
# Task flags, by flag ("--image"): each sets its setting for every task of one command.
FLAGS = {key.flag: key for key in KEYS if key.flag}
