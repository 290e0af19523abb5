"""The settings every attack run shares (the toy world's and a real checkpoint's), checked in one line each."""
from __future__ import annotations

import dataclasses

from unlearn_jax.errors import UnlearnError

METHODS = ("soft", "tokens", "ring-a-bell")
# the soft attack takes many small steps; a coordinate-search step evaluates `candidates` prompts
DEFAULT_STEPS = {"soft": 100, "tokens": 20, "ring-a-bell": 30}


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    method: str = "tokens"
    n_prompts: int = 8        # attacked prompts
    seeds: int = 8            # videos per adversarial prompt and model (n = n_prompts x seeds)
    n_tokens: int = 3         # tokens / ring-a-bell: adversarial tokens added
    steps: int | None = None  # optimisation steps (None: the method's default, DEFAULT_STEPS)
    targets: int = 6          # points of the original's trajectories per prompt (soft / tokens)
    topk: int = 8             # tokens / ring-a-bell: per position, the most promising tokens drawn from
    candidates: int = 24      # tokens / ring-a-bell: single-token swaps evaluated per step
    learning_rate: float = 0.1  # soft (Adam on the embeddings)
    strength: float = 6.0     # ring-a-bell: how far along the concept vector
    vector_pairs: int = 16    # ring-a-bell: prompt pairs the concept vector is averaged over
    seed: int = 0
    # soft / tokens: the prompt the attack starts from: "concept" (the prompt naming the concept, as
    # UnlearnDiffAtk attacks), or "benign" (its counterpart without the concept: the concept has to come
    # from the attack alone); ring-a-bell always starts from the benign prompt
    start: str = "concept"

    @property
    def starts_benign(self) -> bool:
        """Whether the attack starts from the benign prompts (ring-a-bell always does)."""
        return self.method == "ring-a-bell" or self.start == "benign"

    def __post_init__(self):
        if self.method not in METHODS:
            raise UnlearnError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.start not in ("concept", "benign"):
            raise UnlearnError(f"--start {self.start!r}: choose concept or benign")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(v, bool) or not isinstance(v, int) or v < 1) \
                    and f.name != "seed":
                raise UnlearnError(f"{f.name} = {v!r} is invalid; expected an integer >= 1")
        for name in ("learning_rate", "strength"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UnlearnError(f"{name} = {v!r} is invalid; expected a number > 0")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.method])
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise UnlearnError(f"steps = {self.steps!r} is invalid; expected an integer >= 0")
