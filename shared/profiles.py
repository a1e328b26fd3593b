"""Serving profiles: a data file (`profiles.toml`) of request defaults, limits and SLA targets."""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Literal

from pydantic import BaseModel, Field

from shared.contract import JobRequest
from shared.errors import ValidationFailed

ReasoningEffort = Literal["low", "medium", "high"]

DEFAULT_REASONING_EFFORT: ReasoningEffort = "medium"
"""gpt-oss's own default when neither the request nor a profile says."""


class Profile(BaseModel, frozen=True):
    """Defaults and limits applied to a request, and the targets it is served against."""

    name: str
    model: str
    default_max_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(gt=0.0, le=1.0)
    reasoning_effort: ReasoningEffort
    batch_size: int = Field(default=8, ge=1)
    ttft_sla_s: float
    e2e_sla_s: float


class UnknownProfile(ValidationFailed):
    code = "profile_not_found"


def load_profiles(text: str | None = None) -> dict[str, Profile]:
    """All profiles of the data file (or of `text`), by name."""
    if text is None:
        text = resources.files("shared").joinpath("profiles.toml").read_text()
    return {name: Profile(name=name, **entry) for name, entry in tomllib.loads(text)["profiles"].items()}


def profile_named(name: str, profiles: dict[str, Profile] | None = None) -> Profile:
    """The profile called `name`, or a 422 naming the known ones."""
    profiles = profiles if profiles is not None else load_profiles()
    if name not in profiles:
        known = ", ".join(sorted(profiles))
        raise UnknownProfile(
            f"The profile `{name}` does not exist; known profiles: {known}.",
            details=[{"loc": ["profile"], "msg": "unknown profile"}],
        )
    return profiles[name]


def apply_profile(request: JobRequest, profile: Profile | None, default_max_tokens: int) -> JobRequest:
    """`request` with every unset default filled from `profile` (or the server's plain defaults)."""
    filled: dict[str, object]
    if profile is None:
        filled = {
            "max_tokens": request.max_tokens or default_max_tokens,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "reasoning_effort": request.reasoning_effort or DEFAULT_REASONING_EFFORT,
        }
    else:
        filled = {
            "profile": profile.name,
            "max_tokens": request.max_tokens or profile.default_max_tokens,
            "temperature": profile.temperature if request.temperature is None else request.temperature,
            "top_p": profile.top_p if request.top_p is None else request.top_p,
            "reasoning_effort": request.reasoning_effort or profile.reasoning_effort,
        }
    return request.model_copy(update=filled)


def max_tokens_limit(profile: Profile | None, server_limit: int) -> int:
    """The most new tokens a request may ask for: the profile's maximum within the server's."""
    return min(profile.max_tokens, server_limit) if profile is not None else server_limit
