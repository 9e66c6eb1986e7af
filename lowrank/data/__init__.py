"""The test bed: bundled models, text sources, token windows and perplexity.

Everything needed to reproduce a number of this project without a model hub::

    from lowrank.data import load_model, load_windows, perplexity

    model, tokenizer = load_model("smollm2-135m")
    calibration = load_windows(tokenizer, "austen:emma", "calibration", 32, 512, seed=3)
    evaluation = load_windows(tokenizer, "austen:prideprejudice", "evaluation", 8, 512)
    print(perplexity(model, evaluation).perplexity)
"""

from __future__ import annotations

from .austen import AUSTEN_NOVELS, austen_novel
from .bundled import BUNDLED_MODELS, load_model, resolve_model
from .evaluation import PerplexityResult, perplexity
from .text import load_text, text_source_names
from .windows import calibration_windows, evaluation_windows, load_windows, needs_bos, tokenize_text

__all__ = [
    "AUSTEN_NOVELS",
    "austen_novel",
    "BUNDLED_MODELS",
    "load_model",
    "resolve_model",
    "PerplexityResult",
    "perplexity",
    "load_text",
    "text_source_names",
    "calibration_windows",
    "evaluation_windows",
    "load_windows",
    "needs_bos",
    "tokenize_text",
]
