"""One CI job's identity: project, build id, the labels and names derived from them, and
the masker for its secrets (core.secrets). Built once from the settings; the engine and
every module take names, labels and masking from here, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from layerkeep.core.secrets import Masker
from layerkeep.core.settings import Settings

LABEL_PREFIX = "io.layerkeep"
PROJECT_LABEL = f"{LABEL_PREFIX}.project"
BUILD_ID_LABEL = f"{LABEL_PREFIX}.build-id"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_MAX_PART = 60


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
        return cls(settings.project, settings.build_id, settings.masker.plus(extra_secrets))

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
