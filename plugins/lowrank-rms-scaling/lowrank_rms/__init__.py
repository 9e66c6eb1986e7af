"""lowrank-rms-scaling: an example third-party plugin package for ``lowrank``.

It ships two strategies, written against the public API only (``import lowrank``):

- the scaling ``rms`` (:class:`RMSScaling`, in :mod:`lowrank_rms.scaling`);
- the global allocator ``activation-energy`` (:class:`ActivationEnergy`, in
  :mod:`lowrank_rms.allocator`).

The entry point ``rms = "lowrank_rms"`` (group ``lowrank``) names this module; lowrank's plugin
manager calls the two hooks below, each of which registers one strategy class.
"""

from __future__ import annotations

import lowrank

from .allocator import ActivationEnergy, ActivationEnergyConfig
from .scaling import RMSConfig, RMSScaling

__all__ = ["RMSScaling", "RMSConfig", "ActivationEnergy", "ActivationEnergyConfig"]


@lowrank.hookimpl
def lowrank_register_scalings(register):
    register(RMSScaling)


@lowrank.hookimpl
def lowrank_register_allocators(register):
    register(ActivationEnergy)
