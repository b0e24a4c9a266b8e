"""The output folder of a run: written aside, moved into place only when the run succeeds.

`StagedOutput.open` checks the --output folder (not a file, empty or --overwrite, apart from the
folders the run reads) and creates a temporary sibling folder for the results, which proves the
place writable for real. `commit` swaps it into place (the old output is replaced only then);
`discard` removes it and any parent it created, so a failed run leaves everything as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError


def _overlap(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if other in output.parents:
        return "is inside"
    if output in other.parents:
        return "contains"
    return None


class StagedOutput:
    def __init__(self, target: Path, staging: Path, created: list[Path]):
        self.target, self.path, self._created = target, staging, created

    @classmethod
    def open(cls, target: str | os.PathLike, overwrite: bool, reads: dict[str, Path]) -> "StagedOutput":
        """Check --output and create its staging folder; `reads`: what -> folder the run reads."""
        target = Path(target).absolute()
        for what, folder in reads.items():
            relation = _overlap(target.resolve(), Path(folder).absolute().resolve())
            if relation:
                raise InputError(f"--output {target} {relation} the {what} {folder}: the run reads it, "
                                 f"choose another --output")
        if target.exists() and not target.is_dir():
            raise InputError(f"--output {target} is a file, not a folder: choose another --output")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise InputError(f"--output {target} already exists: pass --overwrite or choose another --output")
        created = [p for p in reversed(target.parents) if not p.exists()]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # as a plain mkdir would make it, not mkdtemp's 0700
        except OSError as exc:
            for folder in reversed(created):
                if folder.is_dir():
                    folder.rmdir()
            raise InputError(f"--output {target} is not writable ({exc.strerror or exc}): choose another "
                             f"--output") from None
        return cls(target, staging, created)

    def commit(self) -> Path:
        """Put the results in place of --output (an old output is removed after the swap)."""
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / self.target.name)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old)
        return self.target

    def discard(self) -> None:
        """Remove the staging folder and the parents `open` created."""
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break


class RankOutput:
    """Where a rank other than 0 of a multi-rank run puts what the run writes: a private temporary
    folder, removed at the end whatever happens (rank 0 alone writes the user's --output)."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="fatezero-fast-rank-"))
        self.target = self.path

    def commit(self) -> Path:
        self.discard()
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
