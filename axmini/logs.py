"""A quiet start: what libraries print on their own is silenced unless asked for; our warnings are one line each.

TensorFlow (loaded by seqio) and XLA log from C++ as their shared libraries load and probe for CUDA (`oneDNN custom
operations are on`, `failed call to cuInit`), before absl logging is initialized and whatever TF_CPP_MIN_LOG_LEVEL
says. `native_stderr_silenced()` points file descriptor 2 at a temporary file around such a block and replays it
only when the block fails. `configure(verbose)` (the commands' `--verbose`) turns that off, and otherwise raises
absl's Python logging (orbax's notices) to errors, prints log records as `WARNING: message` on one line, and
Python warnings on one line too. AXMINI_VERBOSE=1 in the environment is --verbose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

_verbose = os.environ.get("AXMINI_VERBOSE", "") not in ("", "0")


def one_line(text: str) -> str:
    """`text` with its whitespace runs (newlines included) as single spaces."""
    return " ".join(text.split())


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def _warning_on_one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {one_line(str(message))} ({os.path.basename(filename)}:{lineno})\n"


def configure(verbose: bool = False) -> None:
    """Sets up stderr for a command: our log records and Python warnings on one line each; with `verbose`, the
    libraries' own output as they print it."""
    global _verbose
    _verbose = verbose or _verbose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # A no-op where logging is set up already.
    if not _verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
        warnings.formatwarning = _warning_on_one_line


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Within this block, what is written to file descriptor 2 (C++ logging) is held back; it is replayed if the
    block raises, and shown as it comes in verbose mode."""
    if _verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
