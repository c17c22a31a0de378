"""Model access: the single place that decides whether a user may use a model, and filters model lists.

Every surface goes through it: `/chat` and `/models`, Ollama's native API and the OpenAI-compatible `/v1`.
Each user has an allow-list of models, or none (`null`: every model). Names are compared as Ollama reads them,
so allowing `llama3.2` allows `llama3.2:latest`.
"""

from collections.abc import Iterable
from typing import Any

from auth.users import User
from core.errors import Forbidden

# What Go's strings.TrimSpace removes (unicode.IsSpace), with which Ollama trims a model name. Python's own
# str.strip() also removes \x1c-\x1f, which Go keeps: a name Ollama can't resolve must not pass for an
# allowed one.
GO_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def canonical_model_name(name: str) -> str:
    """Ollama's own reading of a name: `llama3.2` means `llama3.2:latest`.

    Comparing canonical names never lets a request through that Ollama would resolve to another model: every
    other spelling Ollama accepts for a model (`library/llama3.2`, a registry host, other letter case) is
    compared as written and refused unless the admin listed it that way."""
    name = name.strip(GO_WHITESPACE)
    last_part = name.rsplit("/", 1)[-1]
    return name if ":" in last_part else f"{name}:latest"


class ModelPolicy:
    def allows(self, user: User, model: str) -> bool:
        """`model` is a canonical name."""
        if user.models is None:
            return True
        return any(canonical_model_name(allowed) == model for allowed in user.models)

    def require(self, user: User, model: str) -> None:
        if not self.allows(user, canonical_model_name(model)):
            raise Forbidden(f"you may not use the model '{model}'")

    def visible(self, user: User, entries: Iterable[Any], name_key: str) -> list[dict[str, Any]]:
        """The entries of a model list (Ollama's `name`/`model`, OpenAI's `id`) the user may use."""
        return [
            entry
            for entry in entries
            if isinstance(entry, dict)
            and isinstance(entry.get(name_key), str)
            and self.allows(user, canonical_model_name(entry[name_key]))
        ]
