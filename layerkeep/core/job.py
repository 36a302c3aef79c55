"""One CI job's identity: project, build id, the labels and names derived from them, and
the masker for its secrets. Built once from the settings; the engine and every module
take names, labels and masking from here, so they cannot disagree.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from layerkeep.core.settings import MASK, Settings

LABEL_PREFIX = "io.layerkeep"
PROJECT_LABEL = f"{LABEL_PREFIX}.project"
BUILD_ID_LABEL = f"{LABEL_PREFIX}.build-id"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_MAX_PART = 60


@dataclass(frozen=True)
class Masker:
    """Replaces every known secret, in each form it may take in output, by MASK."""

    values: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, secrets: Iterable[str], *, logins: Iterable[tuple[str, str]] = ()) -> Masker:
        """Mask ``secrets`` plain and URL-quoted, and each (user, password) as Basic auth."""
        found: set[str] = set()
        for value in secrets:
            found.update((value, quote(value, safe=""), quote(value)))
        for user, password in logins:
            if password:
                found.add(base64.b64encode(f"{user}:{password}".encode()).decode())
        # Longest first, so a secret containing another is hidden whole.
        return cls(tuple(sorted(found - {""}, key=len, reverse=True)))

    def plus(self, secrets: Iterable[str]) -> Masker:
        """This masker with more values (their quoted forms too)."""
        return Masker.of([*self.values, *secrets])

    def mask(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for value in self.values:
            text = text.replace(value, MASK)
        return text


@dataclass(frozen=True)
class Job:
    """Who a job is on a shared engine; two jobs differ in project or build id."""

    project: str
    build_id: str
    masker: Masker = field(default_factory=Masker, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, extra_secrets: Iterable[str] = ()) -> Job:
        """The job the settings describe, masking every secret value they found.

        Those are the settings' ``secret_values`` (passwords, LAYERKEEP_SECRETS, secret-
        named variables), here also URL-quoted and the registry login as Basic auth.
        """
        logins = [(settings.registry_user, settings.registry_password)]
        masker = Masker.of([*settings.secret_values, *extra_secrets], logins=logins)
        return cls(settings.project, settings.build_id, masker)

    @property
    def labels(self) -> dict[str, str]:
        """The labels on everything this job creates."""
        return {PROJECT_LABEL: self.project, BUILD_ID_LABEL: self.build_id}

    @property
    def label_filter(self) -> list[str]:
        """The engine's ``label`` filter selecting what this job created."""
        return [f"{key}={value}" for key, value in self.labels.items()]

    @property
    def network(self) -> str:
        """The job's network: ``layerkeep-<project>-<build id>``, sanitised for Docker."""
        return f"layerkeep-{_slug(self.project)}-{_slug(self.build_id)}"

    def container_name(self, service: str) -> str:
        """The container named ``service`` in this job: ``<network>-<service>``."""
        return f"{self.network}-{_slug(service)}"

    def owns(self, labels: Mapping[str, str] | None) -> bool:
        """Whether a resource with these labels was created by this job."""
        return (labels or {}).items() >= self.labels.items()

    def mask(self, text: str) -> str:
        """``text`` with this job's secrets masked."""
        return self.masker.mask(text)


def _slug(text: str) -> str:
    """``text`` within Docker's name alphabet; altered text gets a hash so slugs stay apart."""
    slug = _UNSAFE.sub("-", text)[:_MAX_PART]
    if slug == text:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest
