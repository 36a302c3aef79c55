"""git.*: make the build context stable across checkouts."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.git.touch import touch as touch_files

from .taskkit import reported, say, settings


@task(help={"author_time": "use each commit's author time instead of its committer time"})
@reported
def touch(c: Context, author_time: bool = False) -> None:
    """Set every tracked file's mtime to its last commit's time."""
    folder = settings(c).project_dir
    report = touch_files(folder, author_time=author_time)
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
