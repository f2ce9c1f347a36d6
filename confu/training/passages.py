"""Real passages for the prompt source: standard-library docstrings and man pages already on the machine.

Tasks that need a text to work on (summarization, extraction, retrieval-style QA) get one of these, so the
training prompts carry real prose without ever touching benchmark data. `strip_roff` turns a man(7) page into
plain text by section.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MIN_PASSAGE_CHARS = 300
MAX_PASSAGE_CHARS = 2000
MAN_DIR = Path("/usr/share/man")


@dataclass(frozen=True)
class Passage:
    """A real text used as the object of a summarization / extraction / RAG prompt."""

    title: str  # the documented name, e.g. "json.dumps" or "gzip(1)"
    source: str  # "python" or "man"
    text: str


# Curated instead of walking sys.stdlib_module_names: importing everything would run GUI / side-effect
# modules (tkinter, antigravity, this) and makes the passage set depend on optional C extensions.
_STDLIB_MODULES = (
    "json", "collections", "itertools", "functools", "os", "pathlib", "re", "datetime", "argparse",
    "textwrap", "string", "random", "statistics", "math", "heapq", "bisect", "shutil", "subprocess",
    "socket", "urllib.parse", "csv", "decimal", "fractions", "logging", "threading", "queue", "asyncio",
    "contextlib", "dataclasses", "enum", "typing", "zipfile", "tarfile", "gzip", "hashlib", "secrets",
    "base64", "struct", "io", "tempfile", "glob", "fnmatch", "difflib", "pprint", "operator", "copy",
    "pickle", "configparser", "calendar", "uuid", "ipaddress", "http.client", "email.message", "html",
    "xml.etree.ElementTree", "unittest", "timeit", "traceback", "warnings", "weakref", "array", "codecs",
    "platform", "selectors", "zlib", "lzma", "bz2", "smtplib", "urllib.request", "http.server", "graphlib",
    "sched", "shlex", "cmd", "filecmp", "numbers", "inspect", "ast", "tokenize", "types",
    "concurrent.futures", "multiprocessing", "binascii", "mimetypes", "reprlib", "plistlib", "optparse",
    "pdb", "pkgutil", "sysconfig", "code", "zoneinfo", "contextvars",
)


def _fits(text: str) -> bool:
    return MIN_PASSAGE_CHARS <= len(text) <= MAX_PASSAGE_CHARS


@lru_cache(maxsize=1)
def stdlib_passages() -> tuple[Passage, ...]:
    """Docstrings of stdlib modules, their public classes / functions and class methods, 300-2000 chars."""
    out: list[Passage] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        # Touching deprecated attributes (typing.io, typing.re, ...) warns; reading their docs is harmless.
        warnings.simplefilter("ignore")
        for mod_name in _STDLIB_MODULES:
            out.extend(_module_passages(mod_name, seen))
    return tuple(out)


def _module_passages(mod_name: str, seen: set[str]) -> list[Passage]:
    try:
        module = importlib.import_module(mod_name)
    except Exception:  # an optional extension missing on this build is not an error
        return []
    objects: list[tuple[str, Any]] = [(mod_name, module)]
    for name in sorted(dir(module)):
        obj = getattr(module, name, None)
        # Only objects defined in this module: re-exports would duplicate passages under other names.
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            objects.append((f"{mod_name}.{name}", obj))
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    objects.append((f"{mod_name}.{name}.{meth_name}", meth))
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            objects.append((f"{mod_name}.{name}", obj))
    out: list[Passage] = []
    for title, obj in objects:
        doc = (inspect.getdoc(obj) or "").strip()
        if _fits(doc) and doc not in seen:
            seen.add(doc)
            out.append(Passage(title=title, source="python", text=doc))
    return out


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\(..|\[[^\]]*\]|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*?\((em|en)"), "-"),
    (re.compile(r"\\\*?\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\*?\((aq|oq|cq)"), "'"),
    (re.compile(r"\\\*?\(bu"), "*"),
    (re.compile(r"\\\*?\(..|\\\*?\[[^\]]*\]|\\\*."), ""),  # any other named glyph / string
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%c:]"), ""),
]
_ROFF_BREAKS = {"PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "RS", "RE", "SS", "SH", "ne", "in", "ti",
                "nf", "fi", "ad", "na", "ll", "TH", "pc", "ft", "ps", "ce", "de", "ds", "ig", "nr", "so",
                "if", "ie", "el", "tr", "hy", "nh", "UC", "PD", "TQ", "EX", "EE", "YS", "YE", "SY", "OP"}


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def strip_roff(source: str) -> dict[str, str]:
    """Convert a man(7) page to plain text, split by section name (``{"DESCRIPTION": "...", ...}``)."""
    sections: dict[str, list[str]] = {}
    current = "_"
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro == "SH":
                current = " ".join(_roff_args(rest)).upper()
                continue
            if macro in {"B", "I", "SM", "SB"}:
                line = " ".join(_roff_args(rest))
            elif macro in {"BR", "RB", "IR", "RI", "BI", "IB"}:
                line = "".join(_roff_args(rest))  # alternating fonts are glued without spaces
            elif macro == "TP" or macro in _ROFF_BREAKS or macro == "":
                sections.setdefault(current, []).append("")  # paragraph break
                continue
            else:
                continue  # unknown request: dropping it loses formatting, never prose
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        sections.setdefault(current, []).append(line.replace("\\\\", "\\"))
    result: dict[str, str] = {}
    for name, lines in sections.items():
        paragraphs = " ".join(line if line else "\n\n" for line in lines).split("\n\n")
        text = "\n\n".join(re.sub(r"\s+", " ", p).strip() for p in paragraphs if p.strip())
        result[name] = text
    return result


def _clip_paragraphs(text: str) -> str:
    """Keep whole paragraphs up to the length limit so passages never end mid-sentence."""
    kept: list[str] = []
    for para in text.split("\n\n"):
        if sum(len(p) + 2 for p in kept) + len(para) > MAX_PASSAGE_CHARS:
            break
        kept.append(para)
    return "\n\n".join(kept)


@lru_cache(maxsize=1)
def _man_files() -> tuple[Path, ...]:
    files: list[Path] = []
    for section in ("man1", "man5", "man7", "man8"):
        folder = MAN_DIR / section
        if folder.is_dir():
            files.extend(sorted(folder.glob("*.gz")))
    return tuple(files)


def man_passages(k: int, rng: random.Random) -> list[Passage]:
    """Up to ``k`` DESCRIPTION sections of man pages (English pages only), sampled with ``rng``."""
    files = list(_man_files())
    rng.shuffle(files)
    out: list[Passage] = []
    families: dict[str, int] = {}
    for path in files[: max(4 * k, k + 20)]:  # many pages are stubs or aliases; read a bounded surplus
        if len(out) >= k:
            break
        # Some packages ship hundreds of near-identical pages (gcloud_*, git-*); cap each family.
        family = re.split(r"[-_.]", path.name, maxsplit=1)[0]
        if families.get(family, 0) >= 2:
            continue
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError, ValueError):
            continue
        if source.lstrip().startswith(".so") or "\n.Dd" in source[:3000]:
            continue  # aliases and mdoc(7) pages: not worth a second parser
        text = _clip_paragraphs(strip_roff(source).get("DESCRIPTION", ""))
        if _fits(text):
            page = path.name.removesuffix(".gz")
            name, _, sect = page.rpartition(".")
            out.append(Passage(title=f"{name}({sect})", source="man", text=text))
            families[family] = families.get(family, 0) + 1
    return out
