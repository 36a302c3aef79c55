"""What each task would do, in words, for ``inv --dry``: read settings, change nothing.

Each function reads only the settings and the project's files (the Dockerfile, git's
list of files); none of them connects to the engine or a registry.
"""

from __future__ import annotations

from layerkeep.building.build_plan import images_to_cache, plan_build
from layerkeep.cache.registry_backend import cache_location
from layerkeep.core.job import Job
from layerkeep.core.settings import Settings
from layerkeep.release.push import plan_release
from layerkeep.testrun.database import database_service
from layerkeep.testrun.nodes import local_node_settings
from layerkeep.testrun.split import current_node, find_test_files


def touch_plan(settings: Settings) -> list[str]:
    """git.touch: which folder's tracked files get their last commit's time."""
    return [f"would set the mtime of every tracked file in {settings.project_dir}"]


def cache_where(settings: Settings) -> str:
    """The cache the settings name: a folder or a registry repository."""
    if settings.cache_backend == "registry":
        return f"registry repository {cache_location(settings).repository}"
    return f"folder {settings.cache_dir}"


def load_plan(settings: Settings) -> list[str]:
    """cache.load: what it would restore, from where."""
    images = ", ".join(images_to_cache(settings))
    return [f"would restore {images} from the cache ({cache_where(settings)}) when absent"]


def save_plan(settings: Settings) -> list[str]:
    """cache.save: what it would save, where."""
    images = ", ".join(images_to_cache(settings))
    return [f"would save {images} into the cache ({cache_where(settings)}) when changed"]


def build_plan(settings: Settings) -> list[str]:
    """image.build: each stage and the final image, with the builder setting."""
    plan = plan_build(settings)
    lines = [
        f"would build {target.image}"
        + (f" (stage {target.stage})" if target.stage else "")
        + f" from {plan.dockerfile}"
        for target in plan.targets
    ]
    lines.append(
        f"builder: {settings.builder}; cache sources: "
        + ", ".join(str(image) for image in plan.images)
    )
    return lines


def services_plan(settings: Settings) -> list[str]:
    """services.up: each service, its image and container, on the job's network."""
    job = Job.from_settings(settings)
    if not settings.services:
        return ["no services configured (LAYERKEEP_SERVICES)"]
    return [
        f"would start {spec.name} ({spec.image}) as {job.container_name(spec.name)} "
        f"on network {job.network}"
        for spec in settings.services
    ]


def db_plan(settings: Settings) -> list[str]:
    """db.init: the database it would create and what it would run."""
    service = database_service(settings)
    names = ", ".join(each.db_name for each in local_node_settings(settings))
    lines = [f"would create database {names} on {service.name} if missing"]
    lines += [f"would run {path}" for path in settings.db_init_sql]
    if settings.db_init_command:
        lines.append(f"would run in the app image: {settings.db_init_command}")
    return lines


def tests_plan(settings: Settings) -> list[str]:
    """test.run: the command, the image, the environment's names, the reports folder."""
    names = ", ".join(sorted(settings.test_env)) or "none"
    lines = [
        f"would run in {settings.require_image()}: {settings.test_command}",
        f"test environment: {names}; reports into {settings.reports_dir}",
    ]
    if settings.test_files:
        node, local = current_node(settings), settings.test_nodes
        where = f"as {node}" if node.total > 1 else f"in {local} container(s) at once"
        lines.append(
            f"would split {len(find_test_files(settings))} files of LAYERKEEP_TEST_FILES "
            f"between {max(node.total, local)} node(s), by the test timings kept with the "
            f"cache, and run {where}"
        )
    return lines


def down_plan(settings: Settings) -> list[str]:
    """services.down: what it would remove."""
    if settings.keep_services:
        return ["would keep the services (LAYERKEEP_KEEP_SERVICES)"]
    return [f"would remove this job's containers and network {Job.from_settings(settings).network}"]


def release_plan(settings: Settings) -> list[str]:
    """release.push: the tags and registry, or why nothing would be pushed."""
    return [f"would {plan_release(settings).describe()}"]


def status_plan(settings: Settings) -> list[str]:
    """cache.status: what it would read."""
    return [f"would show what the cache holds ({cache_where(settings)})"]


def prune_plan(settings: Settings, older_than: int) -> list[str]:
    """cache.prune: what it would remove, by which rules (cache.prune --dry-run names each)."""
    if settings.cache_backend == "registry":
        return [
            f"would remove the branch scopes of {cache_where(settings)} not saved for "
            f"{older_than} days or whose branch is gone, never "
            f"{settings.cache_fallback_branch}'s (cache.prune --dry-run lists them)"
        ]
    limit = f"{settings.cache_max_mb} MB" if settings.cache_max_mb else "no limit set"
    return [f"would drop the least recently used images and cache mounts of "
            f"{cache_where(settings)} past LAYERKEEP_CACHE_MAX_MB ({limit})"]
