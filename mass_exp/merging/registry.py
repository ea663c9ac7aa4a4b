"""Registry of mergers: name -> function plus how the pipeline must call it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mass_exp.merging import basic, iso, smile, ties, tsv

__all__ = ["MergerSpec", "available_mergers", "get_merger"]


@dataclass(frozen=True)
class MergerSpec:
    """A merger and its calling convention.

    ``fn(pretrained, finetuned, *, alpha=..., **method_kwargs) -> dict[str, Tensor]`` returns the full merged
    weights θ = θ_pre + α·M(τ_1..τ_T). ``per_task`` mergers also take ``task: int`` (the result depends on the
    evaluated task); ``uses_factors`` mergers accept ``factors: FactorStore | None``. ``builds_module`` mergers
    (SMILE) return an image tower module instead of weights and take ``template=`` (the pretrained tower to copy).
    ``coefficient`` mergers need ``alpha`` (a fixed value or one chosen on validation).
    """

    name: str
    fn: Callable[..., dict]
    per_task: bool = False
    uses_factors: bool = False
    builds_module: bool = False
    coefficient: bool = True


def _specs() -> dict[str, MergerSpec]:
    specs = [
        MergerSpec("zeroshot", basic.zeroshot, coefficient=False),
        MergerSpec("finetuned", basic.finetuned, per_task=True, coefficient=False),
        MergerSpec("weight_average", basic.weight_average),
        MergerSpec("task_arithmetic", basic.task_arithmetic),
        MergerSpec("ties", ties.ties),
        MergerSpec("consensus", ties.consensus),
        MergerSpec("tsv_c", tsv.tsv_c, per_task=True, uses_factors=True),
        MergerSpec("tsv_m", tsv.tsv_m, uses_factors=True),
        MergerSpec("iso_c", iso.iso_c),
        MergerSpec("iso_cts", iso.iso_cts),
        MergerSpec("smile", smile.smile, uses_factors=True, builds_module=True, coefficient=False),
    ]
    return {s.name: s for s in specs}


_REGISTRY: dict[str, MergerSpec] = _specs()


def available_mergers() -> list[str]:
    """Names of all registered mergers, sorted."""
    return sorted(_REGISTRY)


def get_merger(name: str) -> MergerSpec:
    """Look up a merger by name; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merger {name!r}; valid: {', '.join(available_mergers())}") from None
