"""Pure merging library: task vectors, the truncated-SVD factor store and the mergers (MASS_SPEC).

Every merger has the signature ``fn(pretrained, finetuned, *, alpha=..., **method_kwargs) -> dict[str, Tensor]``
and returns the full merged image-tower weights θ = θ_pre + α·M(τ_1..τ_T); see :mod:`mass_exp.merging.registry`.
"""

from mass_exp.merging.basic import finetuned, task_arithmetic, weight_average, zeroshot
from mass_exp.merging.factors import (
    FactorStore,
    build_factor_store,
    factor_cache_key,
    load_or_build_factor_store,
    resolve_rank,
    truncated_svd,
)
from mass_exp.merging.iso import iso_c, iso_cts
from mass_exp.merging.registry import MergerSpec, available_mergers, get_merger
from mass_exp.merging.task_vectors import (
    LazyStateDict,
    StateDict,
    check_endpoints,
    is_matrix_param,
    matrix_keys,
    save_state_dict,
    vector_keys,
)
from mass_exp.merging.ties import consensus, tall_mask_merge, ties
from mass_exp.merging.tsv import tsv_c, tsv_m, tsv_merge_from_factors

__all__ = [
    "FactorStore",
    "LazyStateDict",
    "MergerSpec",
    "StateDict",
    "available_mergers",
    "build_factor_store",
    "check_endpoints",
    "consensus",
    "factor_cache_key",
    "finetuned",
    "get_merger",
    "is_matrix_param",
    "iso_c",
    "iso_cts",
    "load_or_build_factor_store",
    "matrix_keys",
    "resolve_rank",
    "save_state_dict",
    "tall_mask_merge",
    "task_arithmetic",
    "ties",
    "truncated_svd",
    "tsv_c",
    "tsv_m",
    "tsv_merge_from_factors",
    "vector_keys",
    "weight_average",
    "zeroshot",
]
