"""What a build makes: the app image and its named stages, read from the Dockerfile.

Each named stage gets a tag beside the app image (``app:latest-stage-builder``), so
that its layers are kept and reused on their own; an unnamed stage cannot be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.dockerfile import read_stages, root_stage
from layerkeep.core.engine import Engine, image_layers
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.settings import Settings


@dataclass(frozen=True)
class Target:
    """One build: a stage (None for the final image) and the tag it gets."""

    stage: str | None
    image: ImageRef


@dataclass(frozen=True)
class BuildPlan:
    """What to build, in order; the final image comes last."""

    context: Path
    dockerfile: Path
    targets: tuple[Target, ...]
    unnamed_stages: tuple[int, ...] = ()

    @property
    def images(self) -> tuple[ImageRef, ...]:
        """Every image the plan tags: what the cache keeps and builds reuse."""
        return tuple(target.image for target in self.targets)


def stage_image(image: ImageRef, stage: str) -> ImageRef:
    """The tag a named stage gets, beside the app image: ``app:latest-stage-builder``."""
    tag = f"{image.tag}-stage-{stage}"
    if not is_valid_tag(tag):
        raise ConfigError(
            f"stage {stage!r} of {image} gives the invalid tag {tag!r}",
            hint="name stages with letters, digits, '.', '_' or '-', and keep tags short",
        )
    return image.with_tag(tag)


def plan_build(settings: Settings) -> BuildPlan:
    """Read the Dockerfile and list the stage builds and the final build."""
    image = settings.require_image()
    context = settings.context
    if not context.is_dir():
        raise ConfigError(
            f"build context {context} is not a folder",
            key="LAYERKEEP_CONTEXT",
            hint="set LAYERKEEP_CONTEXT to the folder holding your sources",
        )
    dockerfile = context / settings.dockerfile
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read Dockerfile {dockerfile}: {error.strerror}",
            key="LAYERKEEP_DOCKERFILE",
            hint="set LAYERKEEP_DOCKERFILE (relative to LAYERKEEP_CONTEXT)",
        ) from None
    stages = read_stages(text)
    if not stages:
        raise ConfigError(f"{dockerfile} has no FROM line", key="LAYERKEEP_DOCKERFILE")
    earlier = stages[:-1]
    targets = [
        Target(stage.name, stage_image(image, stage.name)) for stage in earlier if stage.name
    ]
    targets.append(Target(None, image))
    unnamed = tuple(stage.index for stage in earlier if not stage.name)
    return BuildPlan(context, dockerfile, tuple(targets), unnamed)


def images_to_cache(settings: Settings, *, app: bool = True) -> list[str]:
    """The app image, its stages and the extra images the settings name; only the extra
    ones without ``app`` (a builder that exports BuildKit's cache keeps the app's)."""
    images = [str(image) for image in plan_build(settings).images] if app else []
    return images + [image for image in settings.cache_images if image not in images]


def own_layers_from(engine: Engine, settings: Settings) -> dict[str, int]:
    """Each image of the plan -> the index of its first layer above its base image: the
    layers its build made, which inline cache must cover for the next build to reuse.

    An image whose base the engine lacks or cannot name (``FROM ${BASE}``) is left out.
    """
    plan = plan_build(settings)
    stages = read_stages(plan.dockerfile.read_text("utf-8"))
    named = {stage.name: stage.index for stage in stages if stage.name}
    found: dict[str, int] = {}
    for target in plan.targets:
        index = named[target.stage] if target.stage else len(stages) - 1
        base = root_stage(stages, index).base
        if "$" in base:
            continue
        if base.lower() == "scratch":
            found[str(target.image)] = 0
            continue
        attrs = engine.image_attrs(base)
        if attrs is not None:
            found[str(target.image)] = len(image_layers(attrs))
    return found
