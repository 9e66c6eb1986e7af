"""Text sources, token windows and the R lazy-load reader behind the Austen novels."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowrank.data import calibration_windows, evaluation_windows, needs_bos
from lowrank.data.austen import AUSTEN_NOVELS, austen_novel, austen_path, unwrap_lines
from lowrank.data.rdata import _RReader
from lowrank.data.text import load_text, pydoc_text, text_source_names

# The hub is unreachable in CI; fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def austen_texts() -> dict[str, str]:
    """All six novels; the apt download happens at most once (then the cache is used)."""
    return {name: austen_novel(name) for name in AUSTEN_NOVELS}


# --- pydoc -----------------------------------------------------------------------------


def test_pydoc_split_is_deterministic_and_disjoint() -> None:
    from pydoc_data.topics import topics

    cal = load_text("pydoc", "calibration")
    ev = load_text("pydoc", "evaluation")
    assert cal == load_text("pydoc:calibration") == pydoc_text("calibration")
    assert ev == load_text("pydoc:evaluation", "calibration")
    assert load_text("pydoc:all") == pydoc_text("all")
    keys = sorted(topics)
    eval_keys = keys[4::5]
    cal_keys = [k for k in keys if k not in eval_keys]
    assert ev == "\n\n".join(topics[k].strip() for k in eval_keys)
    assert cal == "\n\n".join(topics[k].strip() for k in cal_keys)
    assert len(cal) > 3 * len(ev) > 0


# --- windows ---------------------------------------------------------------------------


def test_calibration_windows_deterministic_and_in_range() -> None:
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(tokens, 8, 64, seed=3))
    assert not torch.equal(a, calibration_windows(tokens, 8, 64, seed=4))
    # tokens == positions, so each row must be a contiguous slice starting in range.
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert int(a[:, 0].min()) >= 0 and int(a[:, 0].max()) <= 1000 - 64
    # The protocol: every start in one randint(0, len - seqlen + 1, (n,)) call.
    gen = torch.Generator().manual_seed(3)
    assert a[:, 0].tolist() == torch.randint(0, 1000 - 64 + 1, (8,), generator=gen).tolist()


def test_calibration_starts_are_the_protocols() -> None:
    """AUSTEN-512: 128 windows of 512 from emma's 207,220 SmolLM2 tokens, seed 3 (testbed.md)."""
    windows = calibration_windows(torch.arange(207_220), 128, 512, seed=3)
    assert windows[:4, 0].tolist() == [81190, 105527, 162220, 68199]


def test_the_last_full_window_can_be_drawn() -> None:
    assert calibration_windows(torch.arange(10), 3, 10, seed=0)[:, 0].tolist() == [0, 0, 0]


def test_evaluation_windows_non_overlapping_from_zero() -> None:
    tokens = torch.arange(1000)
    every = evaluation_windows(tokens, 100, None)
    assert every.shape == (10, 100)
    assert torch.equal(every.flatten(), tokens)
    first = evaluation_windows(tokens, 128, 3)
    assert torch.equal(first.flatten(), torch.arange(3 * 128))


def test_bos_windows() -> None:
    bos = 0
    tokens = torch.arange(10, 1010)
    ev = evaluation_windows(tokens, 100, 4, bos_id=bos)
    assert ev.shape == (4, 100)
    assert torch.all(ev[:, 0] == bos)
    assert torch.equal(ev[:, 1:].flatten(), tokens[: 4 * 99])
    # A stream that already starts with BOS does not get a second one.
    with_bos = torch.cat([torch.tensor([bos]), tokens])
    assert torch.equal(evaluation_windows(with_bos, 100, 4, bos_id=bos), ev)
    cal = calibration_windows(tokens, 5, 50, seed=0, bos_id=bos)
    assert cal.shape == (5, 50)
    assert torch.all(cal[:, 0] == bos) and torch.all(cal[:, 2:] - cal[:, 1:-1] == 1)
    assert torch.equal(cal, calibration_windows(with_bos, 5, 50, seed=0, bos_id=bos))


def test_needs_bos_by_model_type() -> None:
    assert needs_bos(SimpleNamespace(model_type="gemma3_text"))
    assert needs_bos(SimpleNamespace(config=SimpleNamespace(model_type="gemma3")))
    assert not needs_bos(SimpleNamespace(model_type="llama"))


def test_too_short_text_raises_with_counts() -> None:
    tokens = torch.arange(50)
    with pytest.raises(ValueError, match=r"has 50 tokens.*need 64"):
        evaluation_windows(tokens, 64, 1)
    with pytest.raises(ValueError, match=r"has 50 tokens.*need 256"):
        evaluation_windows(tokens, 64, 4)
    with pytest.raises(ValueError, match=r"has 50 tokens.*need at least 64"):
        calibration_windows(tokens, 2, 64, seed=0)


# --- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nope", "gutenberg:emma", "file:", "pydoc:train", "hf:"])
def test_unknown_spec_lists_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        load_text(spec)
    message = str(info.value)
    for form in ("pydoc", "austen:<novel>", "file:<path>", "hf:<dataset>", "wikitext2"):
        assert form in message
    assert len(text_source_names()) >= 5


def test_unknown_novel_lists_names() -> None:
    with pytest.raises(ValueError, match="prideprejudice.*northangerabbey"):
        load_text("austen:ulysses")


def test_file_source(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("Ça va.\n\nSecond paragraph.", encoding="utf-8")
    assert load_text(f"file:{path}") == "Ça va.\n\nSecond paragraph."
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text(f"file:{tmp_path / 'missing.txt'}")


def test_hf_source_unavailable_says_what_to_do() -> None:
    # Either 'datasets' is missing or the hub is offline: both must point at local forms.
    with pytest.raises(RuntimeError, match="file:<path>"):
        load_text("wikitext2", "evaluation")


# --- the R reader and the novels -------------------------------------------------------


def _xdr(*items: int | bytes) -> bytes:
    return b"".join(struct.pack(">i", i) if isinstance(i, int) else i for i in items)


def test_r_reader_handles_na_refs_and_names() -> None:
    # list(a = c("x", NA), b = 7L, c = 1.5) with the `names` symbol written once and a
    # second attribute pairlist referring back to it (REFSXP index 1).
    charsxp = lambda s: _xdr(0x00040009, len(s), s)  # noqa: E731 - tiny local helper
    names_sym = _xdr(0x00000001) + charsxp(b"names")
    stream = b"X\n" + _xdr(3, 0x00040200, 0x00030500, 5, b"UTF-8")
    stream += _xdr(0x00000213, 3)  # VECSXP with attributes, length 3
    stream += _xdr(0x00000210, 2) + charsxp(b"x") + _xdr(0x00000009, -1)  # STRSXP + NA
    stream += _xdr(0x00000402) + names_sym + _xdr(0x00000010, 1) + charsxp(b"n")
    stream += _xdr(0x000000FE)  # end of that STRSXP's attribute pairlist
    stream += _xdr(0x0000000D, 1, 7)  # INTSXP
    stream += _xdr(0x0000000E, 1) + struct.pack(">d", 1.5)  # REALSXP
    stream += _xdr(0x00000402, 0x000001FF, 0x00000010, 3)  # names via back-reference
    stream += charsxp(b"a") + charsxp(b"b") + charsxp(b"c") + _xdr(0x000000FE)
    assert _RReader(stream).read() == {"a": ["x", None], "b": [7], "c": [1.5]}


def test_unwrap_lines() -> None:
    lines = ["Title", "", "", "one line", "  wrapped here", "", None, "last"]
    assert unwrap_lines(lines) == "Title\n\none line wrapped here\n\nlast"


def test_austen_novels(austen_texts: dict[str, str]) -> None:
    assert set(austen_texts) == set(AUSTEN_NOVELS) and len(AUSTEN_NOVELS) == 6
    for name, text in austen_texts.items():
        assert len(text) > 400_000, name
        assert "\r" not in text and "\n\n\n" not in text
        assert austen_path(name).is_file()
    pride = austen_texts["prideprejudice"]
    assert pride.startswith(
        "PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\n"
        "It is a truth universally acknowledged, that a single man in possession"
    )
    assert abs(len(pride) - 684_427) < 1_000
    assert austen_texts["emma"].startswith("EMMA\n\nBy Jane Austen")
    assert load_text("austen:emma") == austen_texts["emma"]
