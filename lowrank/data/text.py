"""One spec syntax for every text source used for calibration and evaluation.

Forms:

- ``pydoc`` — Python's own reference documentation (``pydoc_data.topics``), always
  available offline. Its topics are split deterministically into a calibration part and a
  disjoint evaluation part; plain ``pydoc`` picks the part matching the role, and
  ``pydoc:calibration`` / ``pydoc:evaluation`` / ``pydoc:all`` pick explicitly.
- ``austen:<novel>`` — one of Jane Austen's six novels (see :mod:`lowrank.data.austen`).
- ``file:<path>`` — a plain UTF-8 text file.
- ``hf:<dataset>[:<config>][:<split>]`` — a dataset through the ``datasets`` library
  (needs the package and a reachable hub); the ``text`` column joined by blank lines.
- ``wikitext2`` — alias for ``hf:wikitext:wikitext-2-raw-v1:test``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .austen import AUSTEN_NOVELS, austen_novel

__all__ = ["Role", "load_text", "pydoc_text", "text_source_names"]

Role = Literal["calibration", "evaluation"]

_ROLES: tuple[str, ...] = ("calibration", "evaluation")
_ALIASES: dict[str, str] = {"wikitext2": "hf:wikitext:wikitext-2-raw-v1:test"}
# A lone second hf: field that looks like a split is a split, otherwise a config name.
_SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "dev"})
# Every fifth pydoc topic (by sorted key) is held out for evaluation.
_PYDOC_EVAL_EVERY = 5


def text_source_names() -> list[str]:
    """Return the accepted text-source forms, for help and error messages.

    Returns:
        One human-readable form per line-item, e.g. ``"austen:<novel>"``.
    """
    return [
        "pydoc (Python reference docs; the calibration or evaluation part by role)",
        "pydoc:calibration | pydoc:evaluation | pydoc:all",
        f"austen:<novel> (novel: {', '.join(AUSTEN_NOVELS)})",
        "file:<path> (plain UTF-8 text)",
        "hf:<dataset>[:<config>][:<split>] (needs the 'datasets' package and the hub)",
        f"wikitext2 (= {_ALIASES['wikitext2']})",
    ]


def _unknown(spec: str) -> ValueError:
    forms = "\n  ".join(text_source_names())
    return ValueError(f"unknown text source {spec!r}; valid forms:\n  {forms}")


def pydoc_text(part: Literal["calibration", "evaluation", "all"]) -> str:
    """Return part of Python's reference documentation as one text.

    Topics are sorted by key and every fifth one (index % 5 == 4) forms the evaluation
    part, so the two parts are disjoint and identical on every machine with the same
    CPython version.

    Args:
        part: ``"calibration"``, ``"evaluation"`` or ``"all"``.

    Returns:
        The selected topics joined by blank lines.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "all":
        chosen = keys
    elif part in _ROLES:
        want_eval = part == "evaluation"
        chosen = [
            k
            for i, k in enumerate(keys)
            if (i % _PYDOC_EVAL_EVERY == _PYDOC_EVAL_EVERY - 1) == want_eval
        ]
    else:
        raise _unknown(f"pydoc:{part}")
    return "\n\n".join(topics[k].strip() for k in chosen)


def _hf_text(rest: str, role: Role) -> str:
    """Load ``hf:<dataset>[:<config>][:<split>]`` through the ``datasets`` library."""
    fields = rest.split(":")
    if not fields[0] or len(fields) > 3:
        raise _unknown(f"hf:{rest}")
    dataset = fields[0]
    config: str | None = None
    # Without an explicit split, calibrate on train and evaluate on test, as papers do.
    split = "train" if role == "calibration" else "test"
    if len(fields) == 3:
        config, split = fields[1] or None, fields[2] or split
    elif len(fields) == 2:
        if fields[1] in _SPLIT_NAMES or "[" in fields[1]:
            split = fields[1]
        else:
            config = fields[1] or None
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"text source 'hf:{rest}' needs the 'datasets' package: pip install datasets "
            "(or pass file:<path>, austen:<novel> or pydoc instead)"
        ) from exc
    try:
        data = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "unavailable"
        raise RuntimeError(
            f"could not load dataset {dataset!r} (config={config!r}, split={split!r}) from "
            f"the Hugging Face hub: {type(exc).__name__}: {exc}\n"
            "If the hub is unreachable (or HF_HUB_OFFLINE is set), pass file:<path>, "
            "austen:<novel> or pydoc instead."
        ) from exc
    if "text" not in data.column_names:
        raise ValueError(
            f"dataset {dataset!r} has no 'text' column (columns: {data.column_names})"
        )
    return "\n\n".join(str(t) for t in data["text"])


def load_text(spec: str, role: Role = "calibration") -> str:
    """Load the text named by a source spec.

    Args:
        spec: A source in one of the forms of :func:`text_source_names`.
        role: What the text is for; decides the part of ``pydoc`` and the default split
            of ``hf:`` datasets.

    Returns:
        The whole text as one string.

    Raises:
        ValueError: Unknown form or role, unknown novel, or empty text.
        FileNotFoundError: A ``file:`` path that does not exist.
        RuntimeError: A source that cannot be fetched (missing package, no network).
    """
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    spec = _ALIASES.get(spec.strip(), spec.strip())
    scheme, sep, rest = spec.partition(":")
    if scheme == "pydoc":
        part = rest if sep else role
        if part not in (*_ROLES, "all"):
            raise _unknown(spec)
        text = pydoc_text(part)  # type: ignore[arg-type]  # checked just above
    elif scheme == "austen" and rest:
        text = austen_novel(rest)
    elif scheme == "file" and rest:
        path = Path(rest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text source {spec!r}: no such file {str(path)!r}")
        text = path.read_text(encoding="utf-8")
    elif scheme == "hf" and rest:
        text = _hf_text(rest, role)
    else:
        raise _unknown(spec)
    if not text.strip():
        raise ValueError(f"text source {spec!r} is empty")
    return text
