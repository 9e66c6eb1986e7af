"""The plugin contract: value types, operators, the four strategy bases, the registry, recipes.

The bottom layer of ``lowrank``: it imports nothing from the engine, the formats, ``data`` or the
CLI. Everything a plugin author needs from here is re-exported by ``lowrank`` itself; import it
from there.
"""
