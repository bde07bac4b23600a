"""dsclip's one output path: Python logging under the `dsclip` logger.

Commands call `setup_logging` once; every module logs through a child of the `dsclip` logger
(`logging.getLogger(__name__)`). Rank 0 shows INFO and above, other ranks WARNING and above
(prefixed with their rank). A message that is the same on every rank (progress, evaluations, a
run-level warning) is logged on rank 0 only, so it is printed once per run; a rank's own trouble
(its data ran out) shows with its rank. Library chatter (DeepSpeed's engine lines and
CPU-accelerator notice, torch's CUDA-toolkit notice, open_clip's notes on how it builds a model)
is held back unless the level is debug. `progress` wraps long loops in a progress bar on rank 0
when stderr is a terminal.
"""
import contextlib
import io
import logging
import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

LOGGER = "dsclip"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# DeepSpeed warns so on every CPU-only start (at import), and on every universal checkpoint load
# without tensor parallelism (dsclip has none).
NOTICES = ("Setting accelerator to CPU", "MPU is not provided")

T = TypeVar("T")


def process_rank() -> int:
    """This process's global rank as the launchers set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = "[dsclip]" if rank == 0 else f"[dsclip rank {rank}]"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if not record.name.startswith(LOGGER):
            message = f"{record.name}: {message}"
        if record.levelno >= logging.WARNING:
            return f"{self.prefix} {record.levelname}: {message}"
        return f"{self.prefix} {message}"


class _HeldPrints(io.StringIO):
    """What a library prints inside `prints_as_debug`; `outside` is the stdout log lines still go to."""

    def __init__(self, outside):
        super().__init__()
        self.outside = outside


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record comes (pytest and notebooks swap it), past
    the prints `prints_as_debug` holds back."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout.outside if isinstance(sys.stdout, _HeldPrints) else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class DropMessages(logging.Filter):
    """Drops records whose message contains any of `texts`."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def setup_logging(level: str = "info", rank: Optional[int] = None) -> None:
    """Install dsclip's handler (stdout) on the root logger of this process; idempotent.

    dsclip's messages at `level` and above on rank 0, WARNING and above elsewhere; other
    libraries' warnings everywhere, their INFO lines and notices only at level debug."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    rank = process_rank() if rank is None else rank
    debug = LEVELS[level] == logging.DEBUG
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(_RankFormatter(rank))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger(LOGGER).setLevel(LEVELS[level] if rank == 0 else max(LEVELS[level], logging.WARNING))
    deepspeed = logging.getLogger("DeepSpeed")  # keeps its own handler; a filter survives its import
    for old in [f for f in deepspeed.filters if isinstance(f, DropMessages)]:
        deepspeed.removeFilter(old)
    if not debug:
        deepspeed.addFilter(DropMessages(NOTICES))
    deepspeed.setLevel(logging.DEBUG if debug else logging.WARNING)
    # torch warns that it found no CUDA toolkit each time DeepSpeed builds a CPU op
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.DEBUG if debug else logging.ERROR)


def debug_enabled() -> bool:
    return logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def prints_as_debug(source: str) -> Iterator[None]:
    """Hold back what a library prints to stdout inside the block (DeepSpeed prints its build notes);
    it is logged at DEBUG afterwards."""
    held = _HeldPrints(sys.stdout)
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        for line in held.getvalue().splitlines():
            logging.getLogger(LOGGER).debug("%s: %s", source, line)


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
    """`items`, with a progress bar on rank 0 when stderr is a terminal; plain elsewhere."""
    if process_rank() != 0 or not sys.stderr.isatty() or not logging.getLogger(LOGGER).isEnabledFor(logging.INFO):
        return iter(items)
    from tqdm import tqdm
    return iter(tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True))
