"""Provider adapters, chosen by a provider's ``type:``."""
from __future__ import annotations

from typing import Callable

from ..config.schema import ProviderConfig
from ..upstream import Provider

__all__ = ["create_provider", "PROVIDER_FACTORIES"]


def _openai(config: ProviderConfig) -> Provider:
    from .openai import OpenAIProvider

    return OpenAIProvider(config)


def _simulated(config: ProviderConfig) -> Provider:
    from .simulated import SimulatedProvider

    return SimulatedProvider(config)


PROVIDER_FACTORIES: dict[str, Callable[[ProviderConfig], Provider]] = {
    "openai": _openai,
    "simulated": _simulated,
}


def create_provider(config: ProviderConfig) -> Provider:
    return PROVIDER_FACTORIES[config.type](config)
