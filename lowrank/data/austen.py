"""Jane Austen's six novels, read from Debian's ``r-cran-janeaustenr`` package.

The machines this toolkit is tested on reach PyPI and Debian but no dataset hub, so the
novels come from the Debian package of the R ``janeaustenr`` data set. Installing that
package would pull in R itself, so instead the ``.deb`` is downloaded with
``apt-get download``, unpacked with ``dpkg-deb -x``, and its R lazy-load database
(``data/Rdata.rdx`` + ``data/Rdata.rdb``) is decoded by the small reader of R's XDR
serialization format below. The decoded novels are cached as UTF-8 text files under
``<cache>/austen/<name>.txt`` so the download happens once per machine.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

from .._contract.cache import cache_dir

__all__ = [
    "AUSTEN_NOVELS",
    "austen_novel",
    "austen_path",
    "read_r_lazyload",
    "unwrap_lines",
]

#: The six novels, in the order the R package documents them.
AUSTEN_NOVELS: tuple[str, ...] = (
    "prideprejudice",
    "emma",
    "mansfieldpark",
    "sensesensibility",
    "persuasion",
    "northangerabbey",
)

_DEB_PACKAGE = "r-cran-janeaustenr"
_DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")


# --------------------------------------------------------------------------------------
# R serialization (XDR, format versions 2 and 3)
# --------------------------------------------------------------------------------------

# SEXP type codes and the pseudo-types used only in serialized streams.
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 0, 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP = 255, 254, 253, 252
_MISSINGARG_SXP, _BASENAMESPACE_SXP, _BASEENV_SXP, _EMPTYENV_SXP = 251, 247, 241, 242
_SPECIAL_SINGLETONS = {
    _GLOBALENV_SXP,
    _UNBOUNDVALUE_SXP,
    _MISSINGARG_SXP,
    _BASENAMESPACE_SXP,
    _BASEENV_SXP,
    _EMPTYENV_SXP,
}
_NA_INTEGER = -(2**31)
# CHARSXP encoding flags live in the "levels" bits of the item header.
_LATIN1_MASK, _UTF8_MASK = 1 << 2, 1 << 3


class RSymbol(str):
    """An R symbol (distinguished from a character string only for debugging)."""


class _RReader:
    """Decode one R XDR serialization stream into plain Python values.

    Character vectors become ``list[str | None]`` (``None`` for NA), integer/logical
    vectors ``list[int | None]``, real vectors ``list[float]``, generic vectors
    ``list``, and pairlists ``list[tuple[tag, value]]``. Any object with a ``names``
    attribute that is a generic vector becomes a ``dict``; other attributes are dropped
    because the lazy-load index and the novels need none.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        # Symbols (and environments) are written once and later referenced by index.
        self._refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError("truncated R serialization stream")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def _int(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more int32, upper then lower half
            upper, lower = struct.unpack(">II", self._take(8))
            n = (upper << 32) | lower
        return n

    def read(self) -> Any:
        """Read the header and the single top-level object."""
        if self._take(2) != b"X\n":
            raise ValueError("not an R XDR serialization stream (expected 'X\\n' header)")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimum R version needed to read it
        if version == 3:
            self._take(self._int())  # native encoding name, e.g. b"UTF-8"
        elif version != 2:
            raise ValueError(f"unsupported R serialization format version {version}")
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        sxp = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        levels = flags >> 12

        if sxp == _NILVALUE_SXP or sxp in _SPECIAL_SINGLETONS:
            return None
        if sxp == _REFSXP:
            # The reference index is packed into the upper bits, or follows if it is 0.
            index = flags >> 8 or self._int()
            return self._refs[index - 1]
        if sxp == _SYMSXP:
            name = RSymbol(self._item() or "")
            self._refs.append(name)
            return name
        if sxp == _CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_STRING
            raw = self._take(n)
            return raw.decode("latin-1" if levels & _LATIN1_MASK else "utf-8", "replace")
        if sxp == _LISTSXP:
            return self._pairlist(has_attr, has_tag)

        if sxp in (_LGLSXP, _INTSXP):
            n = self._length()
            values = struct.unpack(f">{n}i", self._take(4 * n))
            value: Any = [None if v == _NA_INTEGER else v for v in values]
        elif sxp == _REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif sxp == _STRSXP:
            value = [self._item() for _ in range(self._length())]
        elif sxp == _VECSXP:
            value = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R object type {sxp} in serialization stream")

        if has_attr:
            attrs = dict(self._item() or [])
            names = attrs.get("names")
            if sxp == _VECSXP and isinstance(names, list) and len(names) == len(value):
                value = dict(zip(names, value, strict=True))
        return value

    def _pairlist(self, has_attr: bool, has_tag: bool) -> list[tuple[str | None, Any]]:
        # Pairlists are written as nested cells; walk the CDR chain iteratively so a long
        # attribute list cannot exhaust Python's recursion limit.
        cells: list[tuple[str | None, Any]] = []
        while True:
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            cells.append((tag, self._item()))
            flags = self._int()
            if flags & 0xFF != _LISTSXP:
                self._pos -= 4  # the CDR is not another cell: let _item() read it
                self._item()  # normally NILVALUE_SXP
                return cells
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))


def _decompress_record(record: bytes, compression: int) -> bytes:
    """Decompress one ``.rdb`` record (R's ``lazyLoadDBfetch`` framing)."""
    if compression in (2, 3):
        # 4-byte length, then a one-byte tag naming the codec actually used.
        tag, body = record[4:5], record[5:]
        if tag == b"Z":
            return zlib.decompress(body)
        if tag == b"2":
            return bz2.decompress(body)
        if tag == b"X":
            return lzma.decompress(body)
        if tag == b"0":
            return body
        raise ValueError(f"unknown lazy-load compression tag {tag!r}")
    if compression == 1:
        return zlib.decompress(record[4:])
    return record


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database.

    Args:
        rdx: The ``.rdx`` index (a gzip- or zlib-compressed serialized list whose
            ``variables`` element maps names to ``(offset, length)`` pairs).
        rdb: The ``.rdb`` data file the offsets point into.

    Returns:
        A dict from object name to its decoded value.
    """
    raw = rdx.read_bytes()
    # R writes the index with saveRDS (gzip); older tools used a length-prefixed zlib blob.
    index_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    index = _RReader(index_bytes).read()
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"{rdx} is not an R lazy-load index")
    compressed = index.get("compressed") or [1]
    compression = int(compressed[0]) if isinstance(compressed, list) else int(compressed)
    data = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        record = data[int(offset) : int(offset) + int(length)]
        out[name] = _RReader(_decompress_record(record, compression)).read()
    return out


# --------------------------------------------------------------------------------------
# Download, unwrap and cache
# --------------------------------------------------------------------------------------


def unwrap_lines(lines: list[str | None]) -> str:
    r"""Join printed lines into paragraphs.

    Single line breaks become spaces; runs of blank lines become one paragraph break
    (``"\\n\\n"``), so a tokenizer sees prose rather than the typesetter's line width.

    Args:
        lines: One element per printed line (``None`` for NA is treated as blank).

    Returns:
        The unwrapped text.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        stripped = (line or "").strip()
        if stripped:
            current.append(stripped)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _download_deb(workdir: Path) -> Path:
    """Fetch the ``.deb`` into ``workdir`` with ``apt-get download``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            "Reading the Austen novels needs Debian's apt-get and dpkg-deb (a Debian or "
            "Ubuntu system). Elsewhere, pass the text as file:<path> or use the 'pydoc' source."
        )
    result = _run(["apt-get", "download", _DEB_PACKAGE], workdir)
    if result.returncode != 0 and "Unable to locate package" in result.stderr:
        # Package lists are missing (fresh container): refresh them once and retry.
        update = _run(["apt-get", "update"], workdir)
        if update.returncode == 0:
            result = _run(["apt-get", "download", _DEB_PACKAGE], workdir)
    debs = sorted(workdir.glob(f"{_DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(
            f"'apt-get download {_DEB_PACKAGE}' failed:\n{result.stderr.strip()}\n"
            "Run 'apt-get update' (as root) and check that deb.debian.org is reachable, "
            "or pass the text as file:<path> instead."
        )
    return debs[-1]


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates 0600 files; the cache is ordinary shared data.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch_all(target: Path) -> None:
    """Download, decode and cache all six novels under ``target``."""
    with tempfile.TemporaryDirectory(prefix="lowrank-austen-") as tmp:
        workdir = Path(tmp)
        deb = _download_deb(workdir)
        unpack = _run(["dpkg-deb", "-x", str(deb), str(workdir / "x")], workdir)
        if unpack.returncode != 0:
            raise RuntimeError(f"'dpkg-deb -x {deb.name}' failed:\n{unpack.stderr.strip()}")
        data_dir = workdir / "x" / _DATA_DIR
        objects = read_r_lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    for name in AUSTEN_NOVELS:
        lines = objects.get(name)
        if not isinstance(lines, list):
            raise RuntimeError(f"{_DEB_PACKAGE} has no character vector named {name!r}")
        _write_atomic(target / f"{name}.txt", unwrap_lines(lines))


def austen_path(name: str) -> Path:
    """Return the cached text file of one novel, downloading the package if needed.

    Args:
        name: One of :data:`AUSTEN_NOVELS`.

    Returns:
        Path of ``<cache>/austen/<name>.txt``.

    Raises:
        ValueError: ``name`` is not one of the six novels.
        RuntimeError: The Debian tools are missing or the download failed.
    """
    if name not in AUSTEN_NOVELS:
        raise ValueError(
            f"unknown Austen novel {name!r}; choose one of: {', '.join(AUSTEN_NOVELS)}"
        )
    target = cache_dir() / "austen"
    path = target / f"{name}.txt"
    if not path.is_file():
        _fetch_all(target)
    return path


def austen_novel(name: str) -> str:
    """Return the full unwrapped text of one of Jane Austen's novels.

    Args:
        name: One of :data:`AUSTEN_NOVELS` (e.g. ``"prideprejudice"``).

    Returns:
        The novel as one string, paragraphs separated by blank lines.
    """
    return austen_path(name).read_text(encoding="utf-8")
