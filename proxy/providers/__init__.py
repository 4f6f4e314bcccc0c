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


def _azure(config: ProviderConfig) -> Provider:
    from .azure import AzureOpenAIProvider

    return AzureOpenAIProvider(config)


def _anthropic(config: ProviderConfig) -> Provider:
    from .anthropic import AnthropicProvider

    return AnthropicProvider(config)


PROVIDER_FACTORIES: dict[str, Callable[[ProviderConfig], Provider]] = {
    "openai": _openai,
    "azure_openai": _azure,
    "anthropic": _anthropic,
    "simulated": _simulated,
}


def create_provider(config: ProviderConfig) -> Provider:
    return PROVIDER_FACTORIES[config.type](config)
