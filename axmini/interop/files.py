"""Output directories written whole or not at all, and the files that travel with a model besides its weights."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from axmini.interop.errors import ConversionError

# Tokenizer and generation settings: copied along when a model moves between axmini and Hugging Face.
MODEL_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def check_output_dir(out: str | Path) -> None:
    """Refuses an output that exists and is not an empty directory (nothing is ever overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} already exists and is not empty; choose a new output directory")


@contextlib.contextmanager
def output_dir(out: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside `out` and renames it to `out` when the block succeeds; on any error it is
    removed, so `out` never holds a half-written result."""
    out = Path(out).absolute()
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # Empty (checked above).
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_files(source: str | Path, target: str | Path) -> list[str]:
    """Copies the tokenizer and generation files of `source` that exist into `target`; returns their names."""
    copied = []
    for name in MODEL_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied
