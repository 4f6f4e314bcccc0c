"""Azure OpenAI: deployment URLs, the ``api-version`` query parameter and the ``api-key`` header."""
from __future__ import annotations

from urllib.parse import quote

from ..upstream import UpstreamRequest
from .openai import OpenAIProvider

__all__ = ["AzureOpenAIProvider"]

DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    """``{base_url}/openai/deployments/{deployment}{path}?api-version=...``; the deployment comes from the
    provider's ``deployments`` map (model -> deployment), defaulting to the model name."""

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        base = config.base_url.rstrip("/")
        self._base = base[: -len("/openai")] if base.endswith("/openai") else base
        self._version = config.api_version or DEFAULT_API_VERSION

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"api-key": key} if key else {}

    async def discover_models(self) -> list[str] | None:
        """Not asked: Azure serves deployments, named in ``deployments``, not the resource's model catalogue."""
        return None

    def url(self, request: UpstreamRequest) -> str:
        deployment = self.config.deployments.get(request.route.model, request.route.model)
        return (f"{self._base}/openai/deployments/{quote(deployment, safe='')}{request.path}"
                f"?api-version={self._version}")
