"""Built-in corpora, read offline from what every lenskit install has.

A source ``builtin:NAME`` (in :func:`lenskit.data.load_corpus`, ``--data`` and the app)
names one of:

- ``shakespeare``: the plays of :func:`lenskit.data.default_corpus`;
- ``python-reference``: the Python language reference's help topics (``pydoc_data``);
- ``python-docs``: docstrings of standard-library modules, one document per module;
- ``mix``: the three kinds in equal shares, cut into sections and interleaved, so any
  prefix of it is a mix. ``lenskit train`` reads it by default: a lens fitted to one kind
  of text reads other kinds worse, and a mix generalises further.

The mix holds only the plays that ``split_documents(default_corpus(), 0.1, seed=0)`` keeps
for training, so the default evaluation (held-out plays) scores text it never trained on.
The Python parts follow the running Python's version.

Example:
    >>> from lenskit.corpora import builtin_corpus
    >>> builtin_corpus("mix").name
    'builtin:mix'
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re

from lenskit.data import Corpus, default_corpus, split_documents
from lenskit.errors import LenskitError

__all__ = ["BUILTIN", "DOC_MODULES", "PREFIX", "builtin_corpus", "is_builtin"]

PREFIX = "builtin:"
SECTION_CHARS = 4000  # about 1,000 tokens: a section of the mix
# Pure-Python standard-library modules with long docstrings, present in every CPython.
DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "math", "operator", "optparse", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shlex",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip
_MIN_DOC = 80  # characters: shorter docstrings ("Return x.") add little text


def _docs(obj: object, prefix: str) -> list[str]:
    """The docstrings of a class or function, and of a class's public methods, named."""
    parts = []
    doc = inspect.getdoc(obj) or ""
    if len(doc) >= _MIN_DOC:
        parts.append(f"{prefix}\n\n{doc}")
    if inspect.isclass(obj):
        for name, member in sorted(vars(obj).items()):
            if not name.startswith("_") and inspect.isfunction(member):
                parts.extend(_docs(member, f"{prefix}.{name}"))
    return parts


def _module_text(name: str) -> str:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, attr, None)
        home = getattr(obj, "__module__", None) or name
        if attr.startswith("_") or home.split(".")[0] != name.split(".")[0]:
            continue  # private, or imported from another package
        if inspect.isclass(obj) or inspect.isfunction(obj):
            parts.extend(_docs(obj, attr))
    return "\n\n".join(p for p in parts if p)


@functools.lru_cache(maxsize=1)
def python_docs() -> Corpus:
    """Docstrings of :data:`DOC_MODULES`, one document per module.

    Each holds the module's docstring and those of at least 80 characters of its public
    classes, functions and methods.
    """
    return Corpus(f"{PREFIX}python-docs", tuple(_module_text(name) for name in DOC_MODULES))


@functools.lru_cache(maxsize=1)
def python_reference() -> Corpus:
    """The Python language reference's help topics (``pydoc_data.topics``), one per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions package pydoc_data separately
        raise LenskitError(
            "this Python has no pydoc_data module: install its full standard library, "
            "or train on a corpus of your own with --data"
        ) from exc
    return Corpus(f"{PREFIX}python-reference", tuple(topics[key] for key in sorted(topics)))


def _sections(text: str, size: int) -> list[str]:
    """Whole paragraphs gathered into sections of at least ``size`` characters.

    The last section may be shorter; a paragraph longer than ``size`` is one section.
    """
    sections, current, n = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n\s*", text):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        n += len(paragraph)
        if n >= size:
            sections.append("\n\n".join(current))
            current, n = [], 0
    if current:
        sections.append("\n\n".join(current))
    return sections


@functools.lru_cache(maxsize=1)
def mixed_corpus() -> Corpus:
    """Plays, reference and docstrings, each cut into sections, in equal shares.

    Each kind's sections are shuffled (``random.Random(i)`` for the i-th kind) and taken
    until its characters reach the smallest kind's total; the kinds are then interleaved,
    each next section coming from the kind with the fewest characters so far.
    """
    plays = split_documents(default_corpus(), 0.1, seed=0)[0]
    kinds = []
    for kind, corpus in enumerate((plays, python_reference(), python_docs())):
        sections = [s for doc in corpus.documents for s in _sections(doc, SECTION_CHARS)]
        random.Random(kind).shuffle(sections)
        kinds.append(sections)
    share = min(sum(map(len, sections)) for sections in kinds)
    taken = [0] * len(kinds)  # characters taken from each kind
    queues = [iter(sections) for sections in kinds]
    documents = []
    while True:
        open_kinds = [k for k in range(len(kinds)) if taken[k] < share]
        if not open_kinds:
            break
        kind = min(open_kinds, key=lambda k: (taken[k], k))
        section = next(queues[kind], None)
        if section is None:  # this kind is spent: close it
            taken[kind] = share
            continue
        documents.append(section)
        taken[kind] += len(section)
    return Corpus(f"{PREFIX}mix", tuple(documents))


BUILTIN = {
    "shakespeare": default_corpus,
    "python-reference": python_reference,
    "python-docs": python_docs,
    "mix": mixed_corpus,
}
"""The built-in corpora by name, each a function returning it."""


def is_builtin(source: object) -> bool:
    """Whether ``source`` is a string naming a built-in corpus (``builtin:...``)."""
    return isinstance(source, str) and source.startswith(PREFIX)


def builtin_corpus(name: str) -> Corpus:
    """The built-in corpus ``name`` (with or without the ``builtin:`` prefix).

    Raises:
        LenskitError: If there is no such corpus.
    """
    key = name.removeprefix(PREFIX)
    if key not in BUILTIN:
        names = ", ".join(PREFIX + k for k in BUILTIN)
        raise LenskitError(f"no built-in corpus {name!r}: choose one of {names}")
    return BUILTIN[key]()
