"""One place that checks a composed config before any asset is touched, and one error style for every failure.

`validate(cfg)` checks every key's range rule (declared beside the key in `schema.py`) and the rules that span
keys (`CROSS_RULES` below), and raises `ConfigError("<key>=<value>: <why>; <what to do>")`. `check_overrides`
composes a config from command-line overrides the way the entry points do, turning Hydra's type / unknown-key
errors into the same one line. Entry points print it as `error: ...` and exit with status 2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields, is_dataclass
from functools import lru_cache
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mass_exp.config.schema import GROUP_SCHEMAS, Config
from mass_exp.errors import ConfigError


def show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return str(value)


def problem(key: str, value: Any, why: str, todo: str) -> ConfigError:
    """The one error style: `<key>=<value>: <why>; <what to do>` (entry points prefix `error: `)."""
    line = f"{key}={show(value)}: {why}; {todo}"
    return ConfigError(" ".join(line.split()))  # exactly one line


# ------------------------------------------------------------------------------------------------ per-key rules

def _schema_of(group: str, node: DictConfig) -> type | None:
    """The schema a composed group node was built from (its object type), or None (an untyped node)."""
    t = OmegaConf.get_type(node)
    return t if t is not None and is_dataclass(t) else None


def _rules(schema: type, prefix: str = "") -> Iterable[tuple[str, Callable]]:
    for f in fields(schema):
        sub = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(sub):
            yield from _rules(type(sub), f"{prefix}{f.name}.")
        elif f.metadata.get("rule") is not None:
            yield prefix + f.name, f.metadata["rule"]


def _value(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _check_node(cfg: DictConfig, prefix: str, schema: type) -> None:
    for name, rule in _rules(schema):
        k = f"{prefix}{name}"
        try:
            v = _value(cfg, k)
        except OmegaConfBaseException as e:
            if "Missing mandatory value" in str(e):
                raise problem(k, "???", "must be set", f"set it on the command line: {k}=...") from None
            raise problem(k, OmegaConf.select(cfg, k, throw_on_resolution_failure=False), f"does not resolve "
                          f"({type(e).__name__}: {_first_line(e)})", "fix the value or the interpolation") from None
        p = rule(v)
        if p is not None:
            raise problem(k, v, p[0], p[1])


# ------------------------------------------------------------------------------------------ rules across keys

@lru_cache(maxsize=None)
def _arch_depth(arch: str) -> int | None:
    """Vision-tower depth of an open_clip architecture, read from its model config (None: unknown architecture)."""
    candidates = [Path(str(resources.files("mass_exp").joinpath("models/model_configs")))]
    spec = find_spec("open_clip")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "model_configs")
    for d in candidates:
        f = d / f"{arch}.json"
        if f.is_file():
            return int(json.loads(f.read_text())["vision_cfg"]["layers"])
    return None


def _backbone(cfg: DictConfig) -> None:
    arch = cfg.backbone.arch
    depth = _arch_depth(arch)
    if depth is None:
        raise problem("backbone.arch", arch, "is not an open_clip architecture",
                      "use e.g. ViT-B-32, ViT-B-16, ViT-L-14 or mass-tiny-ViT")
    if cfg.backbone.routing_block >= depth:
        raise problem("backbone.routing_block", cfg.backbone.routing_block,
                      f"is outside {cfg.backbone.name} (blocks 0..{depth - 1})", f"pick a block in 0..{depth - 1}")
    if cfg.router.name != "none" and cfg.router.block >= depth:
        raise problem("router.block", cfg.router.block, f"is outside {cfg.backbone.name} (blocks 0..{depth - 1})",
                      f"pick a block in 0..{depth - 1}")


def _tasks(cfg: DictConfig) -> None:
    from mass_exp.data.mini import MINI_TASKS
    from mass_exp.data.tasks import get_task

    for name in cfg.suite.tasks:
        try:
            get_task(str(name))
        except ConfigError:
            raise problem("suite.tasks", list(cfg.suite.tasks), f"{name!r} is not a known task",
                          "use the tasks of mass_exp/resources/tasks.json or the mini tasks "
                          f"({', '.join(MINI_TASKS)})") from None
    if cfg.endpoints.source == "mini":
        real = [t for t in cfg.suite.tasks if t not in MINI_TASKS]
        if real:
            raise problem("suite.tasks", list(cfg.suite.tasks), f"endpoints=mini has endpoints for the generated "
                          f"mini tasks only, not {real[0]}", "pick endpoints=tall_masks|retrained|fusion_bench|local "
                          "for the real suites")


def _method(cfg: DictConfig) -> None:
    from mass_exp.merging.registry import available_mergers, get_merger
    from mass_exp.routing.config import SAMPLE_ROUTERS

    m = cfg.method
    if m.name not in available_mergers():
        raise problem("method.name", m.name, "is not a registered merger",
                      f"pick one of {', '.join(sorted(available_mergers()))}")
    if m.alpha_protocol == "validation" and not m.alpha_grid:
        raise problem("method.alpha_grid", _value(cfg, "method.alpha_grid"), "alpha_protocol=validation needs a "
                      "non-empty grid", "give one, e.g. method.alpha_grid=[0.1,0.3,1.0]")
    spec = get_merger(m.name)
    if m.alpha_protocol == "fixed" and m.alpha is None and spec.coefficient:
        raise problem("method.alpha", None, f"method={m.name} needs a coefficient", "set e.g. method.alpha=0.3")
    if m.get("lambda_protocol") == "validation" and not m.get("lambda_grid"):
        raise problem("method.lambda_grid", _value(cfg, "method.lambda_grid"), "lambda_protocol=validation needs a "
                      "non-empty grid", "give one, e.g. method.lambda_grid=[0.2,0.4,0.6]")
    lambdas = m.get("lambdas")
    if isinstance(lambdas, ListConfig) and len(lambdas) != len(cfg.suite.tasks):
        raise problem("method.lambdas", list(lambdas), f"needs one value per task ({len(cfg.suite.tasks)})",
                      "give one lambda, or one per task of suite.tasks")
    if spec.per_task and not cfg.eval.task_known:
        raise problem("eval.task_known", False, f"method={m.name} needs the task to pick its model",
                      "set eval.task_known=true or pick a merger of all tasks")
    if cfg.router.name != "none":
        if spec.builds_module:
            raise problem("router", cfg.router.name, f"method={m.name} routes inside every layer itself",
                          "use router=none")
        if spec.per_task:
            raise problem("router", cfg.router.name, f"needs a merger of several tasks and method={m.name} is "
                          "per-task", "use router=none")
        trainable = cfg.endpoints.finetune.trainable if cfg.endpoints.source == "mini" else "all"
        projects = cfg.router.name not in SAMPLE_ROUTERS and not cfg.router.get("oracle_routing")
        if projects and cfg.router.get("routing_param") == "mlp_in" and trainable == "attention":
            raise problem("router.routing_param", "mlp_in", "endpoints.finetune.trainable=attention leaves every "
                          "mlp.c_fc at its pretrained value, so the router has no task subspace to project on",
                          "set router.routing_param=attn_in (or endpoints.routing_param=attn_in)")
        if cfg.router.get("redundancy_eps") is not None and m.name != "tsv_m":
            raise problem("router.redundancy_eps", cfg.router.redundancy_eps, "applies to method=tsv_m only",
                          "set router.redundancy_eps=null or method=tsv_m")


def _trainer(cfg: DictConfig) -> None:
    if cfg.trainer.num_nodes > 1 and cfg.trainer.strategy == "auto":
        raise problem("trainer.num_nodes", cfg.trainer.num_nodes, "several nodes need a distributed strategy",
                      "use trainer=ddp")


#: rules that span several keys, each raising `problem(...)`; order = the order errors are found in
CROSS_RULES: list[Callable[[DictConfig], None]] = [_backbone, _tasks, _method, _trainer]


# ----------------------------------------------------------------------------------------------- entry points

def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed config (types, every key's range, cross-key rules); raise ConfigError naming the first bad
    key. Touches no asset, writes nothing. Returns `cfg`."""
    for group in GROUP_SCHEMAS:  # the groups first: top-level keys may interpolate them (eval.num_workers)
        if group not in cfg:
            raise problem(group, None, "is not selected", f"pick a {group} config, e.g. {group}=<option>")
        node = cfg[group]
        schema = _schema_of(group, node) if isinstance(node, DictConfig) else None
        if schema is None:
            raise problem(group, show(_safe(node)), f"has no schema (conf/{group}/*.yaml must start with "
                          f"`defaults: [/schema/{group}/<kind>@_here_, _self_]`)", "add the schema line to the YAML")
        _check_node(cfg, f"{group}.", schema)
    _check_node(cfg, "", Config)
    for rule in CROSS_RULES:
        rule(cfg)
    return cfg


def _safe(node: Any) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node
    except Exception:  # pragma: no cover
        return "?"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_KEY_IN_MSG = re.compile(r"(?:full_key|Key|key)[:=]?\s*'?([\w./\[\]-]+)'?")


def composition_error(e: BaseException, overrides: Sequence[str]) -> ConfigError:
    """Hydra's composition error (wrong type, unknown key, unknown option, bad override syntax) as one line."""
    causes = []
    c: BaseException | None = e
    while c is not None:
        causes.append(c)
        c = c.__cause__ or c.__context__
    omega = next((x for x in causes if isinstance(x, OmegaConfBaseException)), None)
    msg = _first_line(e)
    full_key = getattr(omega, "full_key", None) if omega is not None else None
    ov = _override_for(full_key, overrides) if full_key else _override_mentioned(msg, overrides)
    key, value = (ov.split("=", 1) if ov else (full_key or "config", "?"))
    key = key.lstrip("+~")
    if omega is not None:
        why = _first_line(omega)
        if "not in" in why and "Key" in why:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            why = f"{parent or 'the config'} has no key {key.rsplit('.', 1)[-1]!r}"
            where = f" --package {parent}" if parent else ""
            return problem(key, value, why, f"check the spelling (`mass-exp --cfg job{where}` lists the valid keys)")
        why = re.sub(r"\s+", " ", why)
        return problem(key, value, f"wrong type ({why})", _type_hint(omega))
    if "Could not find" in msg or "Could not load" in msg:
        group = key.split("@")[0]
        options = getattr(e, "options", None) or []
        todo = f"pick one of {', '.join(options)}" if options else f"pick one of the files in conf/{group}/"
        return problem(key, value.strip("'\""), f"is not an option of {group}", todo)
    return problem(key, value, re.sub(r"\s+", " ", msg), "fix the override (Hydra syntax: key=value, lists as [a,b])")


def _type_hint(e: OmegaConfBaseException) -> str:
    msg = str(e)
    for word, hint in (("Integer", "give an integer"), ("int", "give an integer"), ("Float", "give a number"),
                       ("float", "give a number"), ("Bool", "give true or false"), ("bool", "give true or false"),
                       ("List", "give a list, e.g. [a,b]"), ("Dict", "give a mapping, e.g. {a:1}")):
        if word in msg:
            return hint
    return "give a value of the key's type"


def _override_for(full_key: str, overrides: Sequence[str]) -> str | None:
    for o in reversed(overrides):
        k = o.split("=", 1)[0].lstrip("+~")
        if k == full_key or full_key.startswith(k + ".") or k.startswith(full_key + "."):
            return o
    return None


def _override_mentioned(msg: str, overrides: Sequence[str]) -> str | None:
    for o in reversed(overrides):
        k = o.split("=", 1)[0].lstrip("+~")
        if k and k in msg:
            return o
    return None


def check_overrides(overrides: Sequence[str], config_dir: str | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config the entry points would run from `overrides` and validate it; ConfigError on any problem.

    Hydra's own errors (a wrong type, an unknown key, an unknown group option, bad syntax) become the same one line.
    """
    return validate(compose_overrides(overrides, config_dir, config_name))


def compose_overrides(overrides: Sequence[str], config_dir: str | None = None, config_name: str = "config",
                      return_hydra_config: bool = False) -> DictConfig:
    """Hydra's composition of `overrides` (schemas applied, no range checks); its errors as one-line ConfigErrors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from mass_exp.config.schema import register

    register()
    if config_dir is None:
        from mass_exp.cli import _config_dir

        config_dir = _config_dir()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise composition_error(e, overrides) from None


def sweep_composition_errors(args: Sequence[str], config_dir: str) -> list[ConfigError]:
    """Before a multirun starts: every value the sweep takes (command line and the preset's sweeper params),
    composed with the fixed overrides, so a wrong type or unknown key is refused up front instead of aborting the
    sweep when its job comes (Hydra composes each job only when it launches it). Range errors are left to the jobs,
    where a bad job fails alone. Returns one error per bad value ([] when all compose, or the sweep is not the basic
    sweeper's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(args))
    except Exception as e:  # bad syntax: one line, as for a single run
        return [composition_error(e, args)]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose_overrides(fixed, config_dir, return_hydra_config=True)
    sweeper = OmegaConf.select(base, "hydra.sweeper._target_", default="") or ""
    if not sweeper.endswith("BasicSweeper"):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()]
    try:
        (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(params + list(args)), None)
    except Exception:
        return []
    seen, errors = set(fixed), []
    for job in jobs:
        for ov in job:
            if ov in seen:
                continue
            seen.add(ov)
            try:
                compose_overrides(fixed + [ov], config_dir)
            except ConfigError as e:
                errors.append(e)
    return errors
