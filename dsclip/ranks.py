"""Decisions one rank makes for all: rank 0 decides (reads a file, checks a folder) and every rank
gets the outcome, an error included, so that no rank goes on to a collective the others skip."""
import logging
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from dsclip.errors import CheckpointError, UserError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")


def describe(error: BaseException) -> str:
    """One line for an error met while handling files."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.filename}: {error.strerror}" if error.filename else str(error.strerror or error)
    return f"{type(error).__name__}: {first_line(error)}"


def rank0_decides(decide: Callable[[], T], error: type[UserError] = CheckpointError) -> T:
    """`decide()` run on rank 0 and its result given to every rank; any exception there is raised on
    every rank as one `error`, so no rank is left waiting at the next collective."""
    outcome: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            outcome = [decide(), None]
        except Exception as e:  # a bug too: every rank must leave, with the traceback logged here
            if not isinstance(e, (UserError, OSError)):
                log.exception("rank 0 failed")
            outcome = [None, describe(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise error(outcome[1])
    return outcome[0]
