"""OpenAI request parameters this server does not implement, and the defaults at which each one
changes nothing (SDKs and proxies send some of them, e.g. `n: 1` or `frequency_penalty: 0`). Set to
anything else, a parameter is refused with `unsupported_parameter`, never silently ignored."""

from __future__ import annotations

import json

from pydantic_core import PydanticCustomError

from shared.json_body import UNSUPPORTED

Defaults = tuple[object, ...]
"""The values (besides null) at which an unimplemented parameter changes nothing."""

PENALTY_OFF: Defaults = (0, 0.0)
NO_TOOLS: Defaults = ([],)
TOOL_CHOICE_NONE: Defaults = ("none", "auto")  # "auto" with no tools chooses none

CHAT_MESSAGE_UNSUPPORTED: dict[str, Defaults] = {
    "name": (),
    "function_call": (),
    "refusal": (),
    "audio": (),
    "annotations": ([],),
}
"""Fields of an OpenAI message (those an SDK echoes back from an answer) beyond role and content."""

SAMPLING_UNSUPPORTED: dict[str, Defaults] = {
    "presence_penalty": PENALTY_OFF,
    "frequency_penalty": PENALTY_OFF,
    "logit_bias": ({},),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
}
"""OpenAI parameters of both endpoints that this server does not implement."""

CHAT_UNSUPPORTED: dict[str, Defaults] = {
    **SAMPLING_UNSUPPORTED,
    "functions": NO_TOOLS,  # the deprecated form of `tools`
    "function_call": TOOL_CHOICE_NONE,
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "verbosity": (),
}
"""What `POST /v1/chat/completions` refuses beyond its defaults."""

COMPLETION_UNSUPPORTED: dict[str, Defaults] = {
    **SAMPLING_UNSUPPORTED,
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
}
"""What `POST /v1/completions` refuses beyond its defaults."""


def is_default(value: object, defaults: Defaults) -> bool:
    """`value` is null or one of `defaults`, type and all (`true` is not `1`, nor `0` `false`)."""
    return value is None or any(type(value) is type(d) and value == d for d in defaults)


def refuse_unsupported(data: object, table: dict[str, Defaults]) -> object:
    """`data` without the parameters of `table` (to validate the rest); raises the pydantic error
    `unsupported_parameter` naming each one set beyond its defaults."""
    if not isinstance(data, dict) or not table.keys() & data.keys():
        return data
    refused = {
        name: f"`{name}` is not supported by this server: leave it unset or send "
        + " or ".join(["null", *(json.dumps(d) for d in table[name])])
        for name in sorted(table.keys() & data.keys())
        if not is_default(data[name], table[name])
    }
    if refused:
        context = {"message": "; ".join(refused.values()), "parameters": refused}
        raise PydanticCustomError(UNSUPPORTED, "{message}", context)
    return {key: value for key, value in data.items() if key not in table}
