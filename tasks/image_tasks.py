"""image.*: build the app image with every cached image as --cache-from."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.build.image import build_image, choose_builder

from .taskkit import engine_for, environ, reported, say, settings


@task(
    help={
        "builder": "auto, legacy or buildkit (default: LAYERKEEP_BUILDER)",
        "image": "app image to build (default: LAYERKEEP_IMAGE)",
    }
)
@reported
def build(c: Context, builder: str | None = None, image: str | None = None) -> None:
    """Build the app image and its named stages, reusing cached layers."""
    current = settings(c, builder=builder, image=image)
    engine = engine_for(current)
    chosen = choose_builder(current.builder, environ(), cli=current.docker_cli, engine=engine)
    build_image(engine, current, chosen, environ(), log=say)
