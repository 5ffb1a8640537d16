"""The embedded default corpus and its SentencePiece vocabulary, generated offline at first use.

Python ships about 1 MB of English prose under the PSF licence: the docstrings of the standard library
and the reference text in `pydoc_data.topics`. `prepare_corpus()` turns them into one paragraph per line
(prose only: code blocks, doctests and headings are dropped), deterministically for a given Python
version, splits every 20th paragraph off for validation, and caches the files under the cache dir
(`$AXMINI_CACHE`, default `~/.cache/axmini`). `prepare_vocab()` trains a SentencePiece model on the
training text (about a second) and caches it next to the corpus. Writes are atomic (temp file, then
rename), so concurrent processes of one launch never read a half-written file.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from axmini.trainer.vocabulary import train_sentencepiece, write_atomic

CORPUS_VERSION = 1
VALIDATION_EVERY = 20  # Paragraph i goes to validation when i % VALIDATION_EVERY == 0.
MAX_CHARS = 1_000_000
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "__pycache__"}


class CorpusFiles(NamedTuple):
    train: Path
    validation: Path


def cache_dir() -> Path:
    """Where generated data lives: `$AXMINI_CACHE`, default `~/.cache/axmini`."""
    return Path(os.environ.get("AXMINI_CACHE") or Path.home() / ".cache" / "axmini")


def corpus_dir() -> Path:
    """The corpus of this Python version and generator version (a change of either makes a new one)."""
    return cache_dir() / f"corpus-v{CORPUS_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of `text` as single lines, keeping prose (no code, doctests, tables or headings)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line.lstrip().startswith((">>>", "...", "|", "+-")) for line in lines):
            continue
        indents = [len(line) - len(line.lstrip()) for line in lines]
        if (min(indents) >= 3 and len(lines) > 1) or re.fullmatch(r"[*=~^\-]+", lines[-1].strip()):
            continue  # A code block (topics indent code by 3) or an underlined heading.
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph) >= 40 and sum(c.isalpha() for c in paragraph) > 0.6 * len(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def _texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from (topics[key] for key in sorted(topics))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(stdlib).parts):
            yield from _docstrings(path)


def corpus_paragraphs() -> list[str]:
    """The corpus, in a fixed order: `pydoc_data.topics`, then stdlib docstrings, up to MAX_CHARS."""
    paragraphs, seen, size = [], set(), 0
    for text in _texts():
        for paragraph in _prose_paragraphs(text):
            if paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
                size += len(paragraph) + 1
        if size >= MAX_CHARS:
            break
    return paragraphs


def prepare_corpus() -> CorpusFiles:
    """The train/validation text files (one paragraph per line), generated on first use."""
    files = CorpusFiles(corpus_dir() / "train.txt", corpus_dir() / "validation.txt")
    if not (files.train.exists() and files.validation.exists()):
        paragraphs = corpus_paragraphs()
        train = [p for i, p in enumerate(paragraphs) if i % VALIDATION_EVERY]
        validation = [p for i, p in enumerate(paragraphs) if i % VALIDATION_EVERY == 0]
        write_atomic(str(files.validation), ("\n".join(validation) + "\n").encode())
        write_atomic(str(files.train), ("\n".join(train) + "\n").encode())
    return files


def prepare_vocab(vocab_size: int = 2048) -> Path:
    """A SentencePiece unigram model trained on the training text (pad=0, eos=1, unk=2, no bos), cached."""
    path = corpus_dir() / f"spm-{vocab_size}.model"
    if not path.exists():
        write_atomic(str(path), train_sentencepiece(str(prepare_corpus().train), vocab_size))
    return path
