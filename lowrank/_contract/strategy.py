"""The common base of scalings, allocators and exporters: a name and a validated config.

A strategy is two things kept apart (the torchao pattern): a user-facing *config* dataclass that
says what to do, and the strategy class whose methods do it. Configs are pydantic dataclasses, so
a recipe file with an unknown key, a wrong type or an out-of-range value fails with a message that
names the field and what was expected.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from typing import Any, ClassVar, Mapping

from .errors import RecipeError

__all__ = ["Strategy", "strategy_config", "EmptyConfig"]


def strategy_config(cls: type) -> type:
    """Decorator for a strategy's config class: a frozen pydantic dataclass that forbids extra keys.

    Example::

        @lowrank.strategy_config
        class ASVDConfig:
            alpha: float = pydantic.Field(0.5, gt=0, le=2)
    """
    import pydantic

    return pydantic.dataclasses.dataclass(
        cls, config=pydantic.ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    )


@strategy_config
class EmptyConfig:
    """A strategy without settings."""


class Strategy(ABC):
    """Base of every pluggable strategy.

    Subclasses set ``name`` (kebab-case, unique within its kind), ``kind`` and ``Config``.
    Construct with a config object, a mapping or keyword arguments::

        Whitening(jitter=1e-6)  ==  Whitening({"jitter": 1e-6})  ==  Whitening(WhiteningConfig(jitter=1e-6))
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any = None, /, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise RecipeError(f"{self.kind} {self.name!r}: pass a config or keyword arguments, not both")
        if config is None or isinstance(config, Mapping):
            config = self.make_config({**(config or {}), **kwargs})
        elif not isinstance(config, self.Config):
            raise RecipeError(
                f"{self.kind} {self.name!r}: expected a {self.Config.__name__} or a mapping, "
                f"got {type(config).__name__}"
            )
        self.config = config

    @classmethod
    def make_config(cls, values: Mapping[str, Any]) -> Any:
        """Validate ``values`` into ``cls.Config``; errors name the field and the expectation."""
        import pydantic

        try:
            return cls.Config(**dict(values))
        except pydantic.ValidationError as err:
            problems = []
            for e in err.errors():
                where = ".".join(str(p) for p in e.get("loc", ())) or "(config)"
                problems.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
            fields = ", ".join(f.name for f in dataclasses.fields(cls.Config)) or "none"
            raise RecipeError(
                f"{cls.kind} {cls.name!r}: " + "; ".join(problems) + f". Valid settings: {fields}."
            ) from None
        except TypeError as err:  # positional misuse
            raise RecipeError(f"{cls.kind} {cls.name!r}: {err}") from None

    def config_dict(self) -> dict[str, Any]:
        """The config as plain data (what a recipe file stores)."""
        return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}

    def to_spec(self) -> dict[str, dict[str, Any]]:
        """``{name: {settings}}``: how a recipe file names this strategy."""
        return {self.name: self.config_dict()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config == self.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.config))
