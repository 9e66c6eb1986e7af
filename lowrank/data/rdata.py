"""A small reader of R's XDR serialization (format versions 2 and 3) and of lazy-load databases.

Enough of the format to decode the ``janeaustenr`` data set (character vectors, lists, data
frames and their attributes); see :mod:`lowrank.data.austen`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["read_r_lazyload"]

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
