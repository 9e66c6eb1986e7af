"""Jane Austen's six novels, read from Debian's ``r-cran-janeaustenr`` package.

The machines this toolkit is tested on reach PyPI and Debian but no dataset hub, so the
novels come from the Debian package of the R ``janeaustenr`` data set. Installing that
package would pull in R itself, so instead the ``.deb`` is downloaded with
``apt-get download``, unpacked with ``dpkg-deb -x``, and its R lazy-load database
(``data/Rdata.rdx`` + ``data/Rdata.rdb``) is decoded by the small reader of R's XDR
serialization format in ``rdata.py``. The decoded novels are cached as UTF-8 text files under
``<cache>/austen/<name>.txt`` so the download happens once per machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .._contract.cache import cache_dir
from .rdata import read_r_lazyload

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
