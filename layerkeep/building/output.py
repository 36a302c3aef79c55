"""Count cached steps from the builders' own output: the figure the product promises."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LEGACY_STEP = re.compile(r"^Step \d+/\d+ : (?P<instruction>.*)$")
_BUILDKIT_VERTEX = re.compile(r"^#(?P<id>\d+) \[(?P<step>[^\]]*\d+/\d+)\] (?P<instruction>.*)$")
# CANCELED: started, then skipped because a later step came from the cache.
_BUILDKIT_CACHED = re.compile(r"^#(?P<id>\d+) (?:CACHED|CANCELED)\s*$")
# A step's cached layers fetched from a registry cache ("#11 sha256:<digest> 26.84MB /
# 26.84MB 0.2s done"): BuildKit fetches a step's own result only when that result came
# from the cache (a step that runs makes its layers here), and may then print the step
# as DONE, without its CACHED line: its state when printed is the fetch's.
# (BuildKit 0.8, in Docker 20.10, prints each step's own digest alone on a line.)
_BUILDKIT_PULL = re.compile(r"^#(?P<id>\d+) (?:extracting )?sha256:[0-9a-f]{64} \S")


@dataclass
class StepTally:
    """Steps seen across the builds of one run; a step's first sighting decides it.

    Building a stage and then the final image walks the stage's steps twice; the
    second time they are cached by the first, which says nothing about the cache.
    """

    reused_by_key: dict[str, bool] = field(default_factory=dict)

    def record(self, key: str, reused: bool) -> None:
        """Note one step; later sightings of the same step are ignored."""
        self.reused_by_key.setdefault(key, reused)

    @property
    def total(self) -> int:
        """Steps that run (FROM excluded)."""
        return len(self.reused_by_key)

    @property
    def reused(self) -> int:
        """Steps the builder took from its cache."""
        return sum(self.reused_by_key.values())

    def summary(self) -> str:
        """``cache: 11/12 steps reused``."""
        return f"cache: {self.reused}/{self.total} steps reused"


@dataclass(frozen=True)
class ReuseSource:
    """Where reused steps can have come from, known before the build starts.

    ``images`` are the cached images passed to the builder; ``engine_entries`` is what
    the engine's own build cache held before the build (a laptop or a self-hosted runner
    keeps it between jobs; a fresh CI machine has none).
    """

    builder: str
    images: int
    engine_entries: int | None
    # The sources are BuildKit's own cache exports, not images.
    exported: bool = False

    def describe(self, tally: StepTally) -> str:
        """The build line: the figure, and honestly, where the hits came from."""
        line = tally.summary()
        if tally.reused == 0:
            return line
        what = "inline cache" if self.builder == "buildkit" else "history"
        source = f"the {what} of {self.images} cached image(s)"
        if self.exported:
            source = "BuildKit's own cache, as the last save exported it"
        if self.images == 0:
            return f"{line}, from this engine's own build cache: no cached image was used"
        if self.engine_entries == 0:
            return f"{line}, from {source}"
        held = "" if self.engine_entries is None else (
            f" ({self.engine_entries} entries before this build)"
        )
        return f"{line}, from {source} or this engine's own build cache{held}"

    def warning(self, tally: StepTally) -> str | None:
        """Why cached images gave no hit at all, when that is worth a warning."""
        if self.images == 0 or tally.total == 0 or tally.reused > 0:
            return None
        if self.exported:
            return (
                "warning: BuildKit read its cache export but matched none of its steps: "
                "a cache exported by another Docker version's BuildKit, or with other build "
                "args, never matches"
            )
        if self.builder == "buildkit":
            return (
                f"warning: BuildKit read the inline cache of {self.images} cached image(s) "
                "but matched none of its steps: images built by another Docker version's "
                "BuildKit (20.10 and 23+ compute different step keys) or with other build "
                "args never match; save the cache from the same Docker version"
            )
        return (
            f"warning: none of {self.images} cached image(s) matched a step: the classic "
            "builder only matches images the classic builder made"
        )


class LegacyParser:
    """Reads the classic builder's stream ("Step 3/9 : RUN ...", " ---> Using cache")."""

    def __init__(self, tally: StepTally) -> None:
        self.tally = tally
        self.stage = -1
        self.pending: str | None = None
        self.pending_cached = False

    def feed(self, line: str) -> None:
        """Take one line of output."""
        text = line.strip()
        match = _LEGACY_STEP.match(text)
        if match:
            self._close()
            instruction = match["instruction"].strip()
            if instruction.upper().startswith("FROM "):
                self.stage += 1
                return
            self.pending = f"{self.stage}:{instruction}"
        elif text == "---> Using cache" and self.pending is not None:
            self.pending_cached = True

    def finish(self) -> None:
        """Record the last step once the build ended."""
        self._close()

    def _close(self) -> None:
        if self.pending is not None:
            self.tally.record(self.pending, self.pending_cached)
        self.pending, self.pending_cached = None, False


class BuildkitParser:
    """Reads BuildKit's plain progress ("#7 [builder 2/4] RUN ...", "#7 CACHED")."""

    def __init__(self, tally: StepTally) -> None:
        self.tally = tally
        self.steps: dict[str, str] = {}
        self.cached: set[str] = set()
        self.pulled: set[str] = set()

    def feed(self, line: str) -> None:
        """Take one line of output."""
        text = line.strip()
        match = _BUILDKIT_VERTEX.match(text)
        if match:
            if not match["instruction"].upper().startswith("FROM "):
                self.steps.setdefault(match["id"], f"{match['step']}:{match['instruction']}")
            return
        for pattern, seen in ((_BUILDKIT_CACHED, self.cached), (_BUILDKIT_PULL, self.pulled)):
            match = pattern.match(text)
            if match:
                seen.add(match["id"])
                return

    def finish(self) -> None:
        """Record every step of this build."""
        from_cache = self.cached | self.pulled
        for vertex, key in self.steps.items():
            self.tally.record(key, vertex in from_cache)
