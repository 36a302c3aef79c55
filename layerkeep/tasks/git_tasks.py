"""git.*: make the build context stable across checkouts."""

from invoke.context import Context

from layerkeep.dryrun import touch_plan
from layerkeep.git.touch import touch as touch_files

from .graph import Done, Note, is_dry, say_plan, settings, step
from .taskkit import say


@step("git.touch", help={"author_time": "use each commit's author time, not its committer time"})
def touch(c: Context, author_time: bool = False) -> Note:
    """Set every tracked file's mtime to its last commit's time."""
    current = settings(c)
    if is_dry(c):
        return say_plan(touch_plan(current))
    report = touch_files(current.project_dir, author_time=author_time)
    for path in report.skipped_dirty:
        say(f"left alone (modified): {path}")
    if report.shallow:
        say(
            "warning: shallow clone: files last changed before its oldest commit get that "
            "commit's time; fetch full history (git fetch --unshallow) for exact times"
        )
    say(
        f"touched {report.touched} files from {report.commits_read} commits "
        f"in {report.seconds:.2f} s"
    )
    dirty = f", {len(report.skipped_dirty)} modified left alone" if report.skipped_dirty else ""
    shallow = " (shallow clone)" if report.shallow else ""
    figures = {
        "files": report.touched,
        "commits_read": report.commits_read,
        "modified_left_alone": len(report.skipped_dirty),
        "shallow": report.shallow,
    }
    return Done(f"{report.touched} files{dirty}{shallow}", figures)
