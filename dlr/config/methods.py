"""The factorization methods, each one declared once: what it is, what it reads, what it becomes.

A `Method` answers what the rest of dlr asks of a method: are the projections low-rank factors
(`factorized`), is there a training-time term that folds away (`residual`), what a folded model
of it is (`deploys_as`), which factorization settings it reads (`knobs`), its part of the default
run name, and whether a dense export reproduces it. Callers look it up (`method_named("dlr")`)
instead of comparing names.

The shipped model code (dlr/hf) builds the layers of full, lowrank and dlr. A method registered
from outside (`register_method`) brings its own: `build` swaps its layers into a freshly built
model, `fold` writes them into the layout of `deploys_as` (docs/architecture.md, "add a method").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dlr.errors import ConfigError, bad_value

from .choices import METHODS
from .sections import FactorizationConfig

# The parts of the default run directory a method may add, and their prefix (runs/llama_60m-dlr-r128-a1-s0).
RUN_NAME_PREFIX = {"rank": "r", "alpha": "a"}
# The settings that scale act(A x); a fold writes the scale into B.
LATENT_KNOBS = ("latent_alpha", "trainable_latent_scale")
KNOBS = tuple(f.name for f in fields(FactorizationConfig) if f.name != "method")


@dataclass(frozen=True)
class Method:
    """One factorization method. `build(model) -> layers swapped` and `fold(model) -> layers
    folded` are for methods whose layers dlr/hf does not ship (None: the shipped layers)."""

    name: str
    doc: str
    knobs: tuple[str, ...]  # the FactorizationConfig settings it reads, besides method
    factorized: bool = True  # rank-r factors A, B: rank is required and Spectron applies
    residual: bool = False  # a training-time term that folds into B (DLR's residual)
    deploys_as: str = ""  # the method of its folded model ("" = itself)
    run_name: tuple[str, ...] = ()  # knobs named in the default run directory (keys of RUN_NAME_PREFIX)
    build: Callable[[Any], int] | None = field(default=None, compare=False)
    fold: Callable[[Any], int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.knobs if k not in KNOBS] + [k for k in self.run_name if k not in RUN_NAME_PREFIX]
        if unknown:
            raise ConfigError(f"method {self.name!r} names unknown setting(s) {unknown}; accepted: {', '.join(KNOBS)} "
                              f"(run_name: {', '.join(RUN_NAME_PREFIX)})")
        if not self.deploys_as:
            object.__setattr__(self, "deploys_as", self.name)

    def reads(self, knob: str) -> bool:
        return knob in self.knobs

    def unused(self) -> set[str]:
        """The factorization settings this method ignores (they do not tell two runs apart)."""
        return set(KNOBS) - set(self.knobs)

    def folds(self, fact: Any) -> bool:
        """Whether a model with the settings `fact` (a FactorizationConfig) has something to fold:
        the residual, the method's own layers, or a latent scale it reads."""
        latent = any(self.reads(k) and getattr(fact, k) not in (None, False) for k in LATENT_KNOBS)
        return self.residual or self.fold is not None or latent

    def exports_dense(self, activation: str) -> bool:
        """A dense LLaMA reproduces it: dense already, or y = B A x (activation=identity)."""
        return not self.factorized or activation == "identity"

    def name_parts(self, **values: Any) -> list[str]:
        """Its part of the default run name, e.g. ["r128", "a1"] from rank=128, alpha=1.0."""
        return [RUN_NAME_PREFIX[k] + (f"{values[k]:g}" if isinstance(values[k], float) else str(values[k]))
                for k in self.run_name]


def register_method(method: Method) -> Method:
    """Make `method` a value of factorization.method for every command; returns it."""
    if method.deploys_as != method.name and method.deploys_as not in METHODS:
        raise bad_value(f"method {method.name!r}: deploys_as", method.deploys_as, METHODS)
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    """The declared method called `name`; ConfigError naming the accepted ones otherwise."""
    if name not in METHODS:
        raise bad_value("method", name, METHODS)
    return METHODS[name]


_LATENT = ("rank", "activation", *LATENT_KNOBS, "bias")
FULL = register_method(Method("full", "dense projections", knobs=("bias",), factorized=False))
LOWRANK = register_method(Method("lowrank", "y = B act(A x)", knobs=_LATENT, run_name=("rank",)))
DLR = register_method(Method("dlr", "lowrank plus the DLR residual (alpha / sqrt(K)) Expand_K(act(A x))", knobs=KNOBS,
                             residual=True, deploys_as=LOWRANK.name, run_name=("rank", "alpha")))
