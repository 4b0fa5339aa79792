"""Committing a checkpoint that several processes write (ZeRO shards, torch distributed checkpoint).

A sharded checkpoint is a directory in which every rank writes its own files. Written in place, a
crash during a save (one rank killed, a node lost) leaves shards of two different steps side by
side under a name that still looks complete (DeepSpeed writes its ``latest`` marker before its
final barrier). So every save goes to a fresh name and is committed only once all ranks are done:

1. rank 0 draws a token and every rank writes into ``<name>.partial-<token>`` (:func:`save_committed`);
2. barrier: every rank has finished its shards;
3. rank 0 renames the directory to ``<name>`` (:func:`commit`): one atomic ``rename``. When
   ``<name>`` already exists (``last.ckpt`` rewritten), it is first renamed to
   ``<name>.old-<token>`` and removed after the commit;
4. barrier: no rank goes on (or reads the checkpoint) before the commit.

Whatever a crash interrupts, ``<name>`` is either the previous complete checkpoint or the new
complete one. The leftovers are recognised by their names (:func:`recover`, run by rank 0 before
a resume): a ``.partial-`` directory was never committed and is removed; an ``.old-`` one is
removed, or renamed back to ``<name>`` when the crash fell between the two renames of step 3
(:func:`interrupted_commits` names such checkpoints for the resume lookup of the other ranks).
Removing a checkpoint renames it to ``<name>.removing-<token>`` first (:func:`remove_path`), so a
half-deleted directory never carries a checkpoint's name either.

Inside the committed directory the layout is the library's own (DeepSpeed's ``checkpoint/`` tag
and ``latest``, or DCP's ``.metadata``): Lightning's strategies load it as they wrote it.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("llamalab")

PARTIAL_DIR = ".partial-"  # <name>.partial-<token>: being written, or never committed
OLD = ".old-"  # <name>.old-<token>: the version a commit replaces, removed after it
REMOVING = ".removing-"  # <name>.removing-<token>: a checkpoint being deleted
MARKERS = (PARTIAL_DIR, OLD, REMOVING)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the directory entry itself is flushed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_committed_name(path: str | os.PathLike[str]) -> bool:
    """False for the names of writes in progress, replaced versions and deletions."""
    return not any(marker in Path(path).name for marker in MARKERS)


def _sibling(path: Path, marker: str, token: str) -> Path:
    return path.with_name(f"{path.name}{marker}{token}")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a link counts, even one whose target is gone


def _delete(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint (file, directory or link; a link's target is left alone): renamed to
    ``<name>.removing-<token>`` first, so that a crash mid-delete leaves no torn checkpoint
    under its own name."""
    target = Path(path)
    if not _exists(target):
        return
    if target.is_dir() and not target.is_symlink():
        doomed = _sibling(target, REMOVING, uuid.uuid4().hex[:8])
        os.replace(target, doomed)
        fsync_dir(target.parent)
        target = doomed
    _delete(target)


def commit(partial: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move a fully written ``partial`` onto ``final`` (rank 0, after the barrier); a previous
    ``final`` (directory, file or link) is set aside under ``.old-`` and removed afterwards."""
    src, dst = Path(partial), Path(final)
    token = src.name.rsplit(PARTIAL_DIR, 1)[-1] if PARTIAL_DIR in src.name else uuid.uuid4().hex
    old = None
    if _exists(dst):
        old = _sibling(dst, OLD, token)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        remove_path(old)
    return dst


def interrupted_commits(folder: str | os.PathLike[str]) -> list[Path]:
    """Names whose commit a crash cut between its two renames: ``<name>`` is missing and its
    previous version waits under ``<name>.old-<token>`` (:func:`recover` puts it back)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for old in root.glob(f"*{OLD}*"):
        name = root / old.name.rsplit(OLD, 1)[0]
        if not _exists(name):
            found.append(name)
    return sorted(set(found))


def recover(folder: str | os.PathLike[str]) -> list[Path]:
    """Clean ``folder`` after a crash (rank 0, before anything else reads it): uncommitted
    ``.partial-`` writes and ``.removing-`` leftovers are deleted; an ``.old-`` version goes back
    to its name if that name is missing, else it is deleted. Returns what was deleted."""
    root = Path(folder)
    if not root.is_dir():
        return []
    for name in interrupted_commits(root):
        old = sorted(root.glob(f"{name.name}{OLD}*"))[-1]
        try:
            os.replace(old, name)
        except FileNotFoundError:  # restored meanwhile by another process
            continue
        log.warning("restored %s: a crash interrupted the commit of its next version", name)
    removed = sorted(p for p in root.iterdir() if not is_committed_name(p))
    for path in removed:
        _delete(path)
    if removed:
        log.warning("removed %d uncommitted or replaced checkpoint(s) of a killed run: %s",
                    len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def save_committed(
    strategy: Any, filepath: str | os.PathLike[str], write: Callable[[Path], None]
) -> Path:
    """Every rank calls this; ``write(path)`` writes this rank's part of the checkpoint at
    ``path``. ``strategy`` is a Lightning strategy (``broadcast``, ``barrier``,
    ``is_global_zero``): the name, the token and the commit come from rank 0."""
    final = Path(strategy.broadcast(str(filepath)))
    token = strategy.broadcast(uuid.uuid4().hex[:12])
    partial = _sibling(final, PARTIAL_DIR, token)
    write(partial)
    strategy.barrier("llamalab-checkpoint-written")
    if strategy.is_global_zero:
        commit(partial, final)
    strategy.barrier("llamalab-checkpoint-committed")
    return final


class CommittedCheckpoints:
    """Mixin for a Lightning strategy (listed before it in the bases): its checkpoints are written
    with :func:`save_committed` (each rank into the fresh name, rank 0 commits) and removed with
    :func:`remove_path`, so neither a crash nor a deletion leaves a half-written checkpoint under a
    complete one's name. The strategy's own ``save_checkpoint`` writes the files."""

    is_global_zero: bool

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        write = super().save_checkpoint  # type: ignore[misc]
        save_committed(self, filepath, lambda path: write(checkpoint, path, storage_options))

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_path(Path(filepath))
