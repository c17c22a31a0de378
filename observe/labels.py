"""Label values a client can't multiply: every series a metric has lives for as long as the process, so a
label that took any name a request carried would let anyone grow the gateway's memory, and every scrape,
without limit (by asking for random model names).
"""

OTHER = "other"  # every value not (yet) admitted, folded into one series
NO_HOST = "none"  # a request that ended before a host was chosen for it
MAX_MODEL_LABELS = 64


class ModelLabels:
    """The model names that get a series of their own: those Ollama answered successfully, the first
    `cap` of them (this process's; they are kept until it stops). Any other name is `OTHER`."""

    def __init__(self, cap: int = MAX_MODEL_LABELS) -> None:
        self._cap = cap
        self._known: set[str] = set()

    def admit(self, model: str) -> None:
        if len(self._known) < self._cap:
            self._known.add(model)

    def label(self, model: str) -> str:
        return model if model in self._known else OTHER
