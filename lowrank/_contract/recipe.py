"""Recipes: what to compress, how, and how much. Built in Python or read from a YAML file.

A recipe names the targets, one or more scalings (applied in order), one allocator, any number
of corrections, one exporter, the ratio (fraction of the targeted matrices' parameters removed),
the device, the dtype policy and the seed. The YAML written next to every compressed model reproduces the run::

    lowrank_recipe: 1
    scalings: [whitening]            # or [{asvd: {alpha: 0.5}}, ...]
    allocator: uniform
    exporter: hf
    ratio: 0.2
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import LowrankError, RecipeError
from .fit_target import DEFAULT_COMPENSATION, checked_compensation
from .recipe_file import parse_recipe_yaml, read_recipe_text
from .registry import BASES, get_registry
from .scaling import Scaling
from .stats import STATISTICS
from .strategy import Strategy

__all__ = ["Recipe", "RECIPE_FILE", "FORMAT_VERSION"]

RECIPE_FILE = "recipe.yaml"
FORMAT_VERSION = 1
_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
_INPUTS = ("sequential", "original")
_FACTORIZATIONS = ("auto", "randomized", "svd")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


def _default(kind: str, where: str) -> Strategy:
    cls = get_registry().default(kind)  # type: ignore[arg-type]
    if cls is None:
        raise RecipeError(f"{where}: no {kind} given and no plugin declares a default {kind}")
    return cls()


def _resolve(kind: str, spec: Any, where: str) -> Strategy:
    """A strategy object from an object, a name, a one-key mapping {name: {settings}}, or None (the
    registered default of the kind)."""
    base = BASES[kind]
    if spec is None:
        return _default(kind, where)
    if isinstance(spec, base):
        return spec
    if isinstance(spec, Strategy):
        raise RecipeError(f"{where}: expected a {kind}, got the {spec.kind} {spec.name!r}")

    if isinstance(spec, str):
        name, settings = spec, {}
    elif isinstance(spec, Mapping) and len(spec) == 1:
        (name, settings), = spec.items()
        settings = {} if settings is None else settings
        if not isinstance(settings, Mapping):
            raise RecipeError(f"{where}: settings of {kind} {name!r} must be a mapping, got {settings!r}")
    else:
        raise RecipeError(
            f"{where}: expected a {kind} name, a one-key mapping {{name: {{settings}}}} or a "
            f"lowrank.{base.__name__} object, got {spec!r}"
        )
    cls = get_registry().get(kind, str(name))  # type: ignore[arg-type]
    try:
        return cls(dict(settings))
    except LowrankError:
        raise
    except (TypeError, ValueError, OverflowError, ArithmeticError) as err:  # a plugin's own check
        raise RecipeError(f"{where}: {kind} {name!r}: {err}") from None


def _check_patterns(key: str, patterns: list[str]) -> None:
    """Every ``re:`` pattern must compile (a typo fails here, not in the middle of a run)."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except (re.error, RecursionError, OverflowError) as err:
                raise RecipeError(f"{key}: {p!r} is not a valid regular expression ({err})") from None


def _check_unique(scalings: list[Strategy]) -> None:
    """A scaling listed twice is a mistake (a stack applies each scaling once, in order)."""
    names = [s.name for s in scalings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RecipeError(f"scalings: {', '.join(map(repr, twice))} listed more than once ({names}); "
                          "list each scaling once (its settings say how strong it is)")


@dataclass
class Recipe:
    """A compression recipe.

    Args:
        scalings: one or more scalings, applied in order (``"whitening"``, ``{"asvd": {"alpha": 0.5}}``
            or strategy objects); ``None``: the registered default scaling.
        allocator: the rank allocator; ``None``: the registered default allocator.
        exporter: how :func:`lowrank.save` writes the result; ``None``: the registered default.
        corrections: corrections run on each block after truncation, in order (default none).
        ratio: fraction of the targeted matrices' parameters to remove, in (0, 1).
        targets: module-name patterns (globs, or ``re:`` regexes); ``None`` means every linear layer
            inside the decoder blocks (never embeddings or lm_head).
        ignore: patterns to leave alone.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: storage dtype of the factors; ``auto`` keeps the layer's dtype. Statistics always
            accumulate in float32 and factorizations run in float64.
        seed: seeds every random choice of the run.
        factorization: ``auto`` takes each SVD by the fastest route that is exact enough (the
            eigendecomposition of the smaller Gram matrix, checked; see the engine's ``svd.py``);
            ``randomized`` is ``auto`` with a randomized range finder tried first where few
            components are kept (at most a quarter of min(m, n), and min(m, n) >= 2048), the spectrum predicts it
            cheaper and its check passes (for weights with a gap at the kept rank; it costs an
            eigenvalue pass per such matrix where it is not used, and stores singular vectors for
            the kept components only); ``svd`` always uses LAPACK's float64 SVD (the reference).
        inputs: ``sequential`` feeds each block the outputs of the already-compressed blocks;
            ``original`` feeds it the uncompressed model's activations.
        target: ``plain`` fits each layer's own output on the inputs it receives; ``compensated``
            (sequential inputs only) fits the compressed layer on the compressed model's inputs X~
            to the original layer's output on the original inputs X: the rank-k minimiser of
            ||W X - W' X~|| is the scaled truncation of W* = W C_x~x C_x~x~^-1 (the error of the
            earlier blocks is compensated, in closed form; SAES-SVD). Works with every scaling.
        compensation: how strongly ``target: compensated`` compensates: a number alpha in [0, 1]
            (W + alpha (W* - W): 0 is the plain target, 1 full compensation; SAES-SVD's weight beta
            is alpha / (1 - alpha)) or ``adaptive`` (our reading of SAES-SVD's ACES: per layer, the
            alpha whose rank-k truncation keeps the largest share of the target's output energy).
            The default 0.25 was the best measured on AUSTEN-512 (docs/recipes.md).
        name: a label stored with the compressed model.
    """

    scalings: Sequence[Any] | None = None
    allocator: Any = None
    exporter: Any = None
    corrections: Sequence[Any] = ()
    ratio: float = 0.2
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    factorization: str = "auto"
    inputs: str = "sequential"
    target: str = "plain"
    compensation: float | str = DEFAULT_COMPENSATION
    name: str = "lowrank"

    def __post_init__(self) -> None:
        if self.scalings is None:
            self.scalings = [_default("scaling", "scalings")]
        if isinstance(self.scalings, (str, Mapping, Scaling)):
            self.scalings = [self.scalings]
        if not isinstance(self.scalings, Sequence) or not self.scalings:
            raise RecipeError(f"scalings: expected a non-empty list, got {self.scalings!r}")
        self.scalings = [_resolve("scaling", s, f"scalings[{i}]") for i, s in enumerate(self.scalings)]
        for i, scaling in enumerate(self.scalings):
            unknown = set(scaling.requires) - STATISTICS
            if unknown:
                raise RecipeError(f"scalings[{i}]: {scaling.name!r} requires {sorted(unknown)}, which the "
                                  f"engine does not collect (known: {', '.join(sorted(STATISTICS))})")
        _check_unique(self.scalings)
        self.allocator = _resolve("allocator", self.allocator, "allocator")
        self.exporter = _resolve("exporter", self.exporter, "exporter")
        if self.corrections is None:
            self.corrections = []
        if isinstance(self.corrections, (str, Mapping, Strategy)):
            self.corrections = [self.corrections]
        if not isinstance(self.corrections, Sequence):
            raise RecipeError(f"corrections: expected a list, got {self.corrections!r}")
        self.corrections = [_resolve("correction", c, f"corrections[{i}]") for i, c in enumerate(self.corrections)]
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise RecipeError(f"ratio: expected a number in (0, 1), got {self.ratio!r}")
        if not 0 < self.ratio < 1:  # compared as given: a huge int never becomes a float
            raise RecipeError(
                f"ratio: expected a number strictly between 0 and 1 (the fraction of the targeted "
                f"parameters removed), got {self.ratio!r}"
            )
        self.ratio = float(self.ratio)
        for key in ("targets", "ignore"):
            value = getattr(self, key)
            if value is None and key == "targets":
                continue
            if isinstance(value, str):
                value = [value]
                setattr(self, key, value)
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
                raise RecipeError(f"{key}: expected a list of module-name patterns, got {value!r}")
            setattr(self, key, list(value))
            _check_patterns(key, list(value))
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise RecipeError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise RecipeError(f"dtype: expected one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MAX_SEED:
            raise RecipeError(f"seed: expected an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if self.factorization not in _FACTORIZATIONS:
            raise RecipeError(f"factorization: expected one of {', '.join(_FACTORIZATIONS)}, got {self.factorization!r}")
        if self.inputs not in _INPUTS:
            raise RecipeError(f"inputs: expected one of {', '.join(_INPUTS)}, got {self.inputs!r}")
        self.compensation = checked_compensation(self.target, self.inputs, self.compensation)
        if not isinstance(self.name, str):
            raise RecipeError(f"name: expected a string, got {self.name!r}")

    # -- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, every strategy resolved to ``{name: {settings}}``."""
        return {
            "lowrank_recipe": FORMAT_VERSION,
            "name": self.name,
            "targets": self.targets,
            "ignore": list(self.ignore),
            "scalings": [s.to_spec() for s in self.scalings],
            "allocator": self.allocator.to_spec(),
            "corrections": [c.to_spec() for c in self.corrections],
            "exporter": self.exporter.to_spec(),
            "ratio": self.ratio,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "factorization": self.factorization,
            "inputs": self.inputs,
            "target": self.target,
            "compensation": self.compensation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """A recipe from plain data; unknown keys and a wrong format version are errors."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping of settings, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("lowrank_recipe", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise RecipeError(f"lowrank_recipe: this version reads format {FORMAT_VERSION}, got {version!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if not isinstance(k, str) or k not in known]
        if unknown:
            raise RecipeError(
                f"unknown recipe key(s) {', '.join(map(repr, unknown))}; valid keys: "
                f"lowrank_recipe, {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Recipe":
        """The recipe of the preset ``name`` (``lowrank recipe list`` shows them), with any field
        overridden: ``Recipe.preset("svd-llm", ratio=0.4, device="cpu")``."""
        data = {**get_registry().preset(name).recipe, **overrides}
        try:
            return cls.from_dict(data)
        except RecipeError as err:
            raise RecipeError(f"preset {name!r}: {err}") from None

    def to_yaml(self) -> str:
        """The recipe as a YAML document (``from_yaml`` reads it back)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        """A recipe from YAML text: a safe loader (a file is data, never code), duplicate keys
        refused, at most ``MAX_RECIPE_BYTES``; every failure is a :class:`RecipeError`."""
        data = parse_recipe_yaml(text)
        return cls.from_dict(data if data is not None else {})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recipe as YAML to ``path``."""
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Recipe":
        """Read a recipe file; errors name the file."""
        path = Path(path)
        text = read_recipe_text(path)  # errors name the file already
        try:
            return cls.from_yaml(text)
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from None

    def summary(self) -> str:
        """One line that says what the recipe does."""
        scal = " -> ".join(repr(s) for s in self.scalings)
        return (f"recipe {self.name!r}: scalings {scal}; allocator {self.allocator!r}; exporter "
                f"{self.exporter!r}; corrections {self.corrections or 'none'}; ratio {self.ratio} removed ({1 - self.ratio:.2f} kept) of the "
                f"targets {self.targets or 'every linear layer in the decoder blocks'}; device "
                f"{self.device}; dtype {self.dtype}; inputs {self.inputs}; target {self.target}; seed {self.seed}")
