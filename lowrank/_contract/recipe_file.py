"""Reading a recipe file, which is data from anyone: a size limit, UTF-8 only, a safe YAML loader
that also refuses duplicate keys, and every failure a :class:`RecipeError` that says where.

Nothing in a recipe is imported, evaluated or unpickled: YAML tags that would build Python objects
(``!!python/object/apply`` and friends) are refused by the safe loader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import RecipeError

__all__ = ["MAX_RECIPE_BYTES", "MAX_RECIPE_VALUES", "read_recipe_text", "parse_recipe_yaml"]

#: The largest recipe file (or text) that is read: real recipes are a few hundred bytes.
MAX_RECIPE_BYTES = 1 << 20
#: The most values a recipe may hold once YAML aliases are expanded (a "billion laughs" guard).
MAX_RECIPE_VALUES = 100_000


def read_recipe_text(path: str | os.PathLike[str]) -> str:
    """The text of a recipe file: at most :data:`MAX_RECIPE_BYTES`, UTF-8."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise RecipeError(f"recipe file {str(path)!r} {what}")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {str(path)!r} is larger than {MAX_RECIPE_BYTES} bytes; a recipe "
                          "is a short YAML file (a few hundred bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RecipeError(
            f"recipe file {str(path)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} on line "
            f"{line}, offset {err.start}); a recipe is a YAML file saved as UTF-8"
        ) from None


def _loader() -> type:
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last)."""
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        loader.flatten_mapping(node)
        seen: set[tuple[type, Any]] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                entry = (type(key), key)
                duplicate = entry in seen
            except TypeError:  # an unhashable key: construct_mapping refuses it just below
                continue
            if duplicate:
                raise RecipeError(f"key {key!r} is given twice in one mapping (line "
                                  f"{key_node.start_mark.line + 1}); give each key once")
            seen.add(entry)
        return loader.construct_mapping(node, deep=deep)

    StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictSafeLoader


_LOADER: type | None = None


def _describe(err: Any) -> str:
    """One line for a YAML error: the problem and where it is."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def _check_expanded_size(data: Any) -> None:
    """Refuse data whose expansion (aliases followed, cycles included) exceeds the value budget."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise RecipeError(f"the recipe holds more than {MAX_RECIPE_VALUES} values once its YAML "
                              "aliases are expanded (or refers to itself); a recipe is short")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)


def parse_recipe_yaml(text: str) -> Any:
    """The data of a YAML document, read with the strict safe loader."""
    import yaml

    global _LOADER
    if not isinstance(text, str):
        raise RecipeError(f"a recipe is YAML text, got {type(text).__name__}")
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is longer than {MAX_RECIPE_BYTES} characters; a recipe is short")
    if _LOADER is None:
        _LOADER = _loader()
    try:
        data = yaml.load(text, Loader=_LOADER)  # noqa: S506  (a SafeLoader subclass)
    except RecipeError:
        raise
    except yaml.YAMLError as err:
        raise RecipeError(f"the recipe is not valid YAML: {_describe(err)}") from None
    except RecursionError:
        raise RecipeError("the recipe is not a usable YAML document: it is nested too deeply") from None
    except (ValueError, TypeError, OverflowError, UnicodeError) as err:
        # e.g. a timestamp or a number the safe constructors cannot build
        raise RecipeError(f"the recipe is not a usable YAML document: {err}") from None
    _check_expanded_size(data)
    return data
