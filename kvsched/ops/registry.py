"""The kernel dispatch layer: each op is its torch reference plus implementations declared against it.

An `Op` lists its implementations statically (no registration by import side effects, no monkeypatching). Every
implementation declares where it runs (`supported(device, dtype)`) and a `priority`; the dispatcher takes an explicit
choice (`impl="cxx"`) or the highest-priority implementation that is supported *and* enabled by default on the device.
Defaults: Triton on CUDA, C++ on CPU, the torch reference everywhere else. Triton under `TRITON_INTERPRET=1` is
supported on CPU tensors for testing but never picked by default there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Impl:
    """One implementation of an op.

    `default_on` names the device types on which the dispatcher may pick this implementation without being asked
    (None: every device); elsewhere it runs only when chosen explicitly (and supported)."""

    name: str
    fn: Callable[..., Any]
    supported: Callable[[torch.device, torch.dtype], bool]
    priority: int
    default_on: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Op:
    """An op: its name, its torch reference (the specification) and the faster implementations registered with it."""

    name: str
    reference: Impl
    impls: tuple[Impl, ...]

    def all(self) -> tuple[Impl, ...]:
        return (self.reference, *self.impls)

    def available(self, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Names of the implementations that can run on (device, dtype), reference first."""
        dev = torch.device(device)
        return [i.name for i in self.all() if i.supported(dev, dtype)]

    def resolve(self, device: torch.device | str, dtype: torch.dtype, impl: str | None = None) -> Impl:
        dev = torch.device(device)
        if impl is not None:
            for cand in self.all():
                if cand.name == impl:
                    if not cand.supported(dev, dtype):
                        raise ValueError(f"{self.name}: implementation {impl!r} does not support {dev.type}/{dtype}")
                    return cand
            raise ValueError(f"{self.name}: unknown implementation {impl!r}; choices: {[i.name for i in self.all()]}")
        best = self.reference
        for cand in self.impls:
            on_default = cand.default_on is None or dev.type in cand.default_on
            if on_default and cand.priority > best.priority and cand.supported(dev, dtype):
                best = cand
        return best


def any_device(dtypes: Iterable[torch.dtype]) -> Callable[[torch.device, torch.dtype], bool]:
    allowed = frozenset(dtypes)
    return lambda device, dtype: dtype in allowed


def on_devices(
    device_types: Iterable[str], dtypes: Iterable[torch.dtype], available: Callable[[], bool]
) -> Callable[[torch.device, torch.dtype], bool]:
    types, allowed = frozenset(device_types), frozenset(dtypes)
    return lambda device, dtype: device.type in types and dtype in allowed and available()
