"""Where training text comes from: named presets (the Debian documentation corpus) or user paths.

A *source spec* is a string on the command line:

- ``debian``: the Debian documentation packages listed in ``/work/shared/notes/data_sources.md``
  (kernel docs, perl pods, Python docs, vim help, git docs, dictionaries, fortunes);
- ``postgresql-doc``: the PostgreSQL HTML manual (an out-of-domain validation set: another package, same field);
- ``python-stdlib``: ``/usr/lib/python3.*`` sources, present on every machine with Python (the fallback);
- anything else: a folder (searched recursively for .txt/.md/.rst/.jsonl, optionally .gz) or a glob.

Each spec expands to *parts* (one glob + one reader). Documents are read lazily so a capped run
(``--max-mb``) never reads the whole corpus, and the parts of all specs are interleaved document by
document so a cap keeps every part represented instead of filling up with whichever sorts first.
"""

from __future__ import annotations

import glob
import gzip
import heapq
import html.parser
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Dictionaries and fortune files are one huge file of tiny entries; group entries into documents of
#: about this many characters so a document carries some context and EOS stays rare.
_GROUP_CHARS = 8192

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl", ".html", ".htm")


@dataclass(frozen=True)
class Part:
    """One glob of files that share a reader."""

    name: str
    pattern: str
    #: text | dict | fortune | html | jsonl | auto (chosen from the file suffix)
    reader: str = "auto"


_PRESETS: dict[str, list[Part]] = {
    "debian": [
        Part("linux-doc", "/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz"),
        Part("linux-doc-txt", "/usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz"),
        Part("perl-doc", "/usr/share/perl/5.*/**/*.pod", "text"),
        Part("python-doc", "/usr/share/doc/python3*/html/_sources/**/*.rst.txt"),
        Part("vim-doc", "/usr/share/vim/vim*/doc/*.txt"),
        Part("git-doc", "/usr/share/doc/git-doc/**/*.txt"),
        Part("dictionaries", "/usr/share/dictd/*.dict.dz", "dict"),
        Part("fortunes", "/usr/share/games/fortunes/*.u8", "fortune"),
    ],
    "postgresql-doc": [Part("postgresql-doc", "/usr/share/doc/postgresql-doc-*/html/*.html", "html")],
    "python-stdlib": [Part("python-stdlib", "/usr/lib/python3.*/**/*.py", "text")],
}

PRESETS = tuple(_PRESETS)


@dataclass
class Document:
    source: str
    text: str


def parts_of(spec: str) -> list[Part]:
    """Expand a source spec into parts; a user path becomes one part per folder/glob."""
    if spec in _PRESETS:
        return _PRESETS[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        # Parts are named by the folder's own name, not the path to it: the name seeds the file order,
        # and the same corpus must give the same dataset wherever it is checked out.
        return [Part(f"{path.resolve().name}:*{suffix}", str(path / "**" / f"*{suffix}{gz}"))
                for suffix in _TEXT_SUFFIXES for gz in ("", ".gz")]
    return [Part(spec, str(path))]


def list_files(part: Part) -> list[str]:
    """Real paths of the part's files, sorted; symlinked duplicates (python3.11-doc -> python3.11) collapse."""
    seen: dict[str, None] = {}
    for name in sorted(glob.glob(part.pattern, recursive=True)):
        if os.path.isfile(name):
            seen.setdefault(os.path.realpath(name), None)
    return list(seen)


def _open_text(path: str) -> str:
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; script/style bodies are not prose."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "pre", "dt", "dd"):
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    lines = (" ".join(line.split()) for line in "".join(parser.chunks).splitlines())
    return "\n".join(line for line in lines if line)


def _grouped(entries: Iterator[str], sep: str) -> Iterator[str]:
    group: list[str] = []
    size = 0
    for entry in entries:
        group.append(entry)
        size += len(entry)
        if size >= _GROUP_CHARS:
            yield sep.join(group)
            group, size = [], 0
    if group:
        yield sep.join(group)


def read_file(path: str, reader: str) -> Iterator[str]:
    """Documents (plain strings) of one file."""
    if reader == "auto":
        bare = path[:-3] if path.endswith(".gz") else path
        reader = "jsonl" if bare.endswith(".jsonl") else "html" if bare.endswith((".html", ".htm")) else "text"
    text = _open_text(path)
    if reader == "text":
        yield text
    elif reader == "html":
        yield html_to_text(text)
    elif reader == "fortune":
        yield from _grouped((q.strip() for q in text.split("\n%\n") if q.strip()), "\n\n")
    elif reader == "dict":
        yield from _grouped((e.strip() for e in text.split("\n\n") if e.strip()), "\n\n")
    elif reader == "jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
    else:
        raise ValueError(f"unknown reader {reader!r} for {path}")


def _part_documents(part: Part, files: list[str], seed: int) -> Iterator[Document]:
    # Shuffle files so a capped run samples the whole part, not its alphabetically first folder.
    order = list(files)
    random.Random(f"{seed}:{part.name}").shuffle(order)
    for path in order:
        for text in read_file(path, part.reader):
            yield Document(part.name, text)


def interleave(parts: list[tuple[Part, list[str]]], seed: int) -> Iterator[Document]:
    """Next document always from the part that has yielded the fewest bytes so far.

    Balancing bytes, not documents, matters: a perl pod is ~40 KB and a kernel doc page ~3 KB,
    so a per-document round-robin would let the big-file parts fill a capped corpus.
    """
    heap = [(0, i, _part_documents(part, files, seed)) for i, (part, files) in enumerate(parts) if files]
    heapq.heapify(heap)
    while heap:
        used, i, it = heapq.heappop(heap)
        doc = next(it, None)
        if doc is not None:
            heapq.heappush(heap, (used + len(doc.text), i, it))
            yield doc
