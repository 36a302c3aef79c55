"""The whole CI job as an ordered list of steps, with cleanup that always runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from layerkeep.build.image import build_image, choose_builder
from layerkeep.cache.backend import describe_load, load_cache, save_cache
from layerkeep.core.engine import Engine
from layerkeep.core.errors import CommandFailed, LayerkeepError
from layerkeep.core.settings import Settings
from layerkeep.git.touch import touch
from layerkeep.release.push import push_release
from layerkeep.services.containers import services_down, services_up
from layerkeep.testing.database import init_database
from layerkeep.testing.testrun import run_tests

Log = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    """A named step; ``run`` returns a short note for the summary (or None)."""

    name: str
    run: Callable[[], str | None]


@dataclass(frozen=True)
class StepRecord:
    """How one step went."""

    name: str
    result: str
    seconds: float
    note: str = ""


@dataclass
class PipelineReport:
    """Every step's record, and the error that stopped the pipeline, if any."""

    records: list[StepRecord] = field(default_factory=list)
    error: LayerkeepError | None = None

    @property
    def passed(self) -> bool:
        """No step failed."""
        return self.error is None


def ci_steps(
    engine: Engine, settings: Settings, environ: Mapping[str, str], log: Log
) -> list[Step]:
    """git.touch, cache.load, image.build, cache.save, services.up, db.init, test.run.

    The cache is saved before the tests run, so a red test run still leaves it warm;
    release.push comes last, when a registry is configured, and only runs when every
    step before it (the tests included) passed.
    """

    def git_touch() -> str:
        report = touch(settings.project_dir)
        return f"{report.touched} files"

    def cache_load() -> str:
        return describe_load(load_cache(engine, settings, log=log))

    def image_build() -> str:
        builder = choose_builder(settings.builder, environ, cli=settings.docker_cli, engine=engine)
        report = build_image(engine, settings, builder, environ, log=log)
        return f"{report.tally.reused}/{report.tally.total} steps reused ({builder.kind})"

    def cache_save() -> str:
        report = save_cache(engine, settings, log=log)
        if report.skipped:
            return "up to date"
        return f"{report.layers_written} layers, {report.bytes_written / 1e6:.1f} MB written"

    def up() -> str:
        running = services_up(engine, settings, log=log)
        return ", ".join(service.spec.name for service in running) + " ready" if running else ""

    def db_init() -> str:
        report = init_database(engine, settings, log=log)
        return f"created {settings.db_name}" if report.created else f"{settings.db_name} exists"

    def tests() -> str:
        result = run_tests(engine, settings, log=log)
        if not result.passed:
            raise CommandFailed(
                f"tests failed (exit {result.exit_code})", return_code=result.exit_code
            )
        return f"passed, {len(result.reports)} report(s)"

    def release() -> str:
        report = push_release(engine, settings, log=log)
        if not report.plan.pushes:
            return report.plan.reason
        return f"{len(report.pushed)} tags at {report.digest[:19]}"

    steps = [
        Step("git.touch", git_touch),
        Step("cache.load", cache_load),
        Step("image.build", image_build),
        Step("cache.save", cache_save),
    ]
    if settings.services:
        steps.append(Step("services.up", up))
        if any(s.name == settings.db_service for s in settings.services):
            steps.append(Step("db.init", db_init))
    steps.append(Step("test.run", tests))
    if settings.registry:
        steps.append(Step("release.push", release))
    return steps


def cleanup_steps(engine: Engine, settings: Settings, log: Log) -> list[Step]:
    """services.down, unless the user keeps the services for debugging."""
    if not settings.services or settings.keep_services:
        return []

    def down() -> str:
        return f"{services_down(engine, settings, log=log)} removed"

    return [Step("services.down", down)]


def insert_step(steps: list[Step], step: Step, *, after: str) -> None:
    """Put ``step`` right after the step named ``after`` (at the end for "")."""
    if not after:
        steps.append(step)
        return
    names = [existing.name for existing in steps]
    if after not in names:
        raise LayerkeepError(
            f"cannot add step {step.name!r} after {after!r}: no such step",
            hint=f"steps: {', '.join(names)}",
        )
    steps.insert(names.index(after) + 1, step)


def run_pipeline(steps: Sequence[Step], *, cleanup: Sequence[Step], log: Log) -> PipelineReport:
    """Run steps in order until one fails; then run every cleanup step, whatever happened."""
    report = PipelineReport()
    try:
        for step in steps:
            if report.error is not None:
                report.records.append(StepRecord(step.name, "skipped", 0.0))
                continue
            log(f"==> {step.name}")
            record, error = _run(step)
            report.records.append(record)
            report.error = error
    finally:
        for step in cleanup:
            log(f"==> {step.name} (cleanup)")
            record, error = _run(step)
            report.records.append(record)
            if report.error is None:
                report.error = error
    return report


def _run(step: Step) -> tuple[StepRecord, LayerkeepError | None]:
    started = time.monotonic()
    try:
        note = step.run() or ""
    except LayerkeepError as error:
        return StepRecord(step.name, "failed", time.monotonic() - started, error.one_line()), error
    return StepRecord(step.name, "ok", time.monotonic() - started, note), None


def format_summary(report: PipelineReport) -> str:
    """A table: step, result, duration, note."""
    rows = [("step", "result", "time", "")] + [
        (r.name, r.result, f"{r.seconds:.1f} s", r.note) for r in report.records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{name:<{widths[0]}}  {result:<{widths[1]}}  {seconds:>{widths[2]}}  {note}".rstrip()
        for name, result, seconds, note in rows
    ]
    total = sum(r.seconds for r in report.records)
    lines.append(f"{'total':<{widths[0]}}  {'':<{widths[1]}}  {f'{total:.1f} s':>{widths[2]}}")
    return "\n".join(lines)
