"""The test environment's templates: ``NAME={service.fact}``, filled once services run.

``LAYERKEEP_TEST_ENV`` maps variables to templates such as ``{postgres.url}``; without
it, DATABASE_URL and REDIS_URL come from the configured services.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from layerkeep.core.errors import ConfigError
from layerkeep.core.service_specs import ServiceSpec

_TEMPLATE = re.compile(r"\{([a-z][a-z0-9-]*)\.([a-z_]+)\}")
FACTS = ("host", "port", "user", "password", "database", "url")


def default_test_env(services: tuple[ServiceSpec, ...], db_service: str) -> dict[str, str]:
    """DATABASE_URL for the database service and REDIS_URL for the first redis."""
    env: dict[str, str] = {}
    if any(s.name == db_service and s.kind == "postgres" for s in services):
        env["DATABASE_URL"] = f"{{{db_service}.url}}"
    redis = next((s for s in services if s.kind == "redis"), None)
    if redis is not None:
        env["REDIS_URL"] = f"{{{redis.name}.url}}"
    return env


def check_templates(env: Mapping[str, str], services: tuple[ServiceSpec, ...], where: str) -> None:
    """Every ``{service.fact}`` in the test environment names a service and a known fact."""
    names = {service.name for service in services}
    for variable, template in env.items():
        for service, fact in _TEMPLATE.findall(template):
            if service not in names or fact not in FACTS:
                raise ConfigError(
                    f"LAYERKEEP_TEST_ENV: {variable} (from {where}) names "
                    f"{{{service}.{fact}}}",
                    key="LAYERKEEP_TEST_ENV",
                    hint=f"services: {', '.join(sorted(names)) or 'none'}; "
                    f"facts: {', '.join(FACTS)}",
                )


def render_template(template: str, facts: Mapping[str, Mapping[str, str]]) -> str:
    """Fill ``{service.fact}`` placeholders from ``facts[service][fact]``."""
    return _TEMPLATE.sub(lambda match: facts[match[1]][match[2]], template)
