"""Where a run's output goes: the console for the user, ``{logging.dir}/train.log`` for the rest.

Megatron, vLLM, torch and Triton print ~100 lines of notices per run (Apex / Transformer
Engine fallbacks, engine settings, NUMA binding, deprecations), once per rank. Inside
:func:`routed`:

- every rank's stdout and stderr, file descriptors 1 and 2, append to ``train.log``: Python
  prints, library progress bars and what C++ code writes straight to the descriptors (torch's
  ``[W... utils.cpp]`` lines) land there, nothing is dropped;
- Python logging (root logger, INFO and up; DEBUG and up for ``prorl_megatron.*``) writes
  every record to ``train.log``, prefixed with the rank; vLLM's loggers propagate there too (``VLLM_CONFIGURE_LOGGING=0``: vLLM otherwise
  gives its logger a handler of its own, without rank, at its own level);
- ``warnings`` go to ``train.log`` as log records (logger ``py.warnings``);
- the console (a duplicate of the original stderr, :func:`console`) shows rank 0's records of
  our own loggers (``prorl_megatron.*``, INFO and up: set-up lines, warnings), warnings whose
  origin is a file of this package, every rank's errors, and whatever writes to :func:`console`
  itself (the progress bar and the step lines of :class:`~prorl_megatron.metrics.Progress`).

An exception leaving the block is written to ``train.log`` with its traceback, then the
descriptors are restored and the exception goes on: Python prints an uncaught one's traceback
on the console, on every rank that fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

LOG_FILE = "train.log"
PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
OWN_LOGGER = "prorl_megatron"

_console: Optional[TextIO] = None  # the user's terminal while output is routed


def console() -> TextIO:
    """The stream the user sees: the original stderr while :func:`routed` is active."""
    return _console if _console is not None else sys.stderr


def launch_rank() -> int:
    """This process's rank from torchrun's or Slurm's variables (0 when launched alone)."""
    from prorl_megatron.parallel import read_launch_env

    try:
        return read_launch_env().rank
    except Exception:  # a broken launch environment is reported by init_parallel, not here
        return 0


class _ConsoleFilter(logging.Filter):
    """Rank 0: our loggers at INFO and up, and warnings from our files; every rank: our errors.
    A record with ``console=False`` (set by :func:`routed` itself) stays off the console."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        chosen = getattr(record, "console", None)
        if chosen is not None:
            return bool(chosen) and (self.rank == 0 or record.levelno >= logging.ERROR)
        if record.name != OWN_LOGGER and not record.name.startswith(OWN_LOGGER + "."):
            return False
        return self.rank == 0 or record.levelno >= logging.ERROR


class _ConsoleFormatter(logging.Formatter):
    """INFO lines as they are (set-up lines); warnings and errors with their level and rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno <= logging.INFO:
            return text
        return f"{record.levelname} (rank {self.rank}) {text}" if self.rank else f"{record.levelname} {text}"


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm, so that a line never lands in the middle of the progress bar."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.stream.flush()
        except Exception:
            self.handleError(record)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """``warnings.showwarning``: a log record; on the console too when our own code warns."""
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    ours = os.path.abspath(filename).startswith(PACKAGE_DIR)
    logging.getLogger("py.warnings").warning("%s", text, extra={"console": ours})


@contextlib.contextmanager
def routed(log_dir: str | os.PathLike, rank: Optional[int] = None, name: str = LOG_FILE) -> Iterator[Path]:
    """Route this process's output as the module docstring says; yields the log file's path.

    Call it before megatron and vLLM are imported: their notices are printed at import.
    """
    global _console
    rank = launch_rank() if rank is None else rank
    path = Path(log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # appends from every rank
    saved = {1: os.dup(1), 2: os.dup(2)}
    _console = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                         errors="backslashreplace")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):  # block-buffered when started on a pipe
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)

    file_handler = logging.StreamHandler(open(path, "a", buffering=1, encoding="utf-8"))
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
    console_handler = _ConsoleHandler(_console)
    console_handler.addFilter(_ConsoleFilter(rank))
    console_handler.setFormatter(_ConsoleFormatter(rank))
    console_handler.setLevel(logging.INFO)
    root, own = logging.getLogger(), logging.getLogger(OWN_LOGGER)
    old_handlers, old_level, old_own_level, old_show = root.handlers[:], root.level, own.level, warnings.showwarning
    root.handlers = [file_handler, console_handler]
    root.setLevel(logging.INFO)
    own.setLevel(logging.DEBUG)  # our debug lines (e.g. the engine's sleep/wake order) in the file only
    warnings.showwarning = _show_warning
    try:
        yield path
    except BaseException as e:
        if not isinstance(e, SystemExit) or e.code not in (0, None):
            logging.getLogger(OWN_LOGGER).error("the run ended with %s: %s", type(e).__name__, e, exc_info=True,
                                                extra={"console": False})
        raise
    finally:
        for stream in (sys.stdout, sys.stderr, _console):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        os.close(saved[1])
        os.close(saved[2])
        warnings.showwarning = old_show
        root.handlers = old_handlers
        root.setLevel(old_level)
        own.setLevel(old_own_level)
        file_handler.close()
        file_handler.stream.close()
        _console = None
