"""Experiment presets (`+experiment=<name>`): each one's sweep expands to the intended jobs, and every job composes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mass_exp.config import validate
from mass_exp.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
BACKBONES = ["ViT-B-32", "ViT-B-16", "ViT-L-14"]
SUITES = ["8", "14", "20"]
STATIC = ["zeroshot", "finetuned", "weight_average", "task_arithmetic", "ties", "consensus", "tsv_c", "tsv_m",
          "iso_c", "iso_cts"]
# static mergers that can be scored without the task (finetuned / tsv_c pick their model by the task)
AGNOSTIC = [m for m in STATIC if m not in ("finetuned", "tsv_c")] + ["smile"]
PER_COL = len(STATIC) + 1 + 1 + len(AGNOSTIC)  # static rows, SMILE, MASS, task-agnostic rows


def _resolve(cfg) -> dict:
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True)


def _jobs(preset: str, extra: list[str] = ()) -> list[list[str]]:
    """The override list of every job `mass-exp -m +experiment=<preset> <extra>` launches (as the basic sweeper
    builds them: the preset's hydra.sweeper.params, then the command line)."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(list(extra)) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={preset}", *fixed], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = parser.parse_overrides(params + [f"+experiment={preset}", *extra])
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def _with_endpoints(job: list[str]) -> list[str]:
    """Real-suite jobs as the presets are documented to run, `endpoints=<source>` (the default endpoints=mini only
    has the mini tasks, which validation refuses)."""
    real = any(o.split("=", 1)[0] == "suite" and "mini" not in o for o in job)
    if real and not any(o.startswith("endpoints=") for o in job):
        return [*job, "endpoints=retrained"]
    return job


def _compose_all(jobs: list[list[str]]) -> list[dict]:
    """Every job composed, validated (mass_exp.config.validate: its schema, ranges and cross-key rules) and
    resolved; a preset job that a run would refuse fails here."""
    jobs = [_with_endpoints(job) for job in jobs]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfgs = [compose(config_name="config", overrides=job, return_hydra_config=True) for job in jobs]
    for job, cfg in zip(jobs, cfgs):
        try:
            validate(cfg)
        except ConfigError as e:
            pytest.fail(f"{' '.join(job)}: {e}")
    return [_resolve(cfg) for cfg in cfgs]


def _summary(cfg: dict) -> tuple:
    r = cfg["router"]
    knobs = {k: r[k] for k in ("mode", "threshold", "max_tasks", "head_selection", "oracle_head", "oracle_routing",
                               "first_pass", "redundancy_eps", "batched", "block") if k in r}
    return cfg["backbone"]["name"], cfg["suite"]["name"], cfg["method"]["name"], r["name"], knobs


def test_presets_exist():
    names = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert names == ["batched_routing", "main_table", "main_table_mini", "main_table_validated", "router_ablation",
                     "routing_block_sweep"]


def _override(job: list[str], key: str) -> str:
    (value,) = [o.split("=", 1)[1].strip("'\"") for o in job if o.split("=", 1)[0].lstrip("+") == key]
    return value


def test_main_table_is_methods_plus_mass_not_methods_x_routers():
    jobs = _jobs("main_table")
    assert len(jobs) == 3 * 3 * PER_COL
    # composed and validated (1/4 s a job): every job of suite 8 (each variant on every backbone) and every MASS job
    # (its routing block depends on the backbone); the other suites' jobs differ from suite 8's only in `suite`
    first = [job for job in jobs if _override(job, "suite") == "8"]
    cfgs = _compose_all(first)
    variant = {_override(job, "experiment/variant"): (c["method"]["name"], c["router"]["name"], c["eval"]["task_known"])
               for job, c in zip(first, cfgs)}
    got = sorted((_override(job, "backbone"), _override(job, "suite"), *variant[_override(job, "experiment/variant")])
                 for job in jobs)
    want = sorted([(b, s, m, "none", True) for b in BACKBONES for s in SUITES for m in STATIC + ["smile"]]
                  + [(b, s, m, "none", False) for b in BACKBONES for s in SUITES for m in AGNOSTIC]
                  + [(b, s, "tsv_m", "projection", True) for b in BACKBONES for s in SUITES])
    assert got == want
    mass = [job for job in jobs if variant[_override(job, "experiment/variant")][1] == "projection"
            and _override(job, "suite") != "8"]
    cfgs += _compose_all(mass)
    assert {(c["backbone"]["name"], c["suite"]["name"]) for c in cfgs if c["router"]["name"] == "projection"} == \
        {(b, s) for b in BACKBONES for s in SUITES}
    assert len({c["run_name"] for c in cfgs}) == len(cfgs)  # task-agnostic runs have their own names
    for c in cfgs:
        assert c["logger"]["group"] == "main_table"
        assert c["logger"]["tags"] == ["main_table", c["backbone"]["name"], f"suite-{c['suite']['name']}"]
        assert c["router"]["name"] == "none" or c["router"]["block"] == c["backbone"]["routing_block"]
        # fixed coefficients of the suite
        if c["method"]["name"] == "task_arithmetic":
            assert c["method"]["alpha"] == {"8": 0.3, "14": 0.2, "20": 0.1}[c["suite"]["name"]]
        if c["router"]["name"] == "projection":
            assert c["router"]["threshold"] == 0.2 and c["router"]["mode"] == "topk" and c["method"]["alpha"] == 1.0


def test_main_table_narrowed_from_the_command_line():
    jobs = _jobs("main_table", ["backbone=ViT-B-32", "suite='8'"])
    assert len(jobs) == PER_COL
    assert {(c["backbone"]["name"], c["suite"]["name"]) for c in _compose_all(jobs)} == {("ViT-B-32", "8")}


def test_main_table_mini():
    cfgs = _compose_all(_jobs("main_table_mini"))
    assert len(cfgs) == PER_COL
    assert sorted((c["method"]["name"], c["router"]["name"], c["eval"]["task_known"]) for c in cfgs) == \
        sorted([(m, "none", True) for m in STATIC + ["smile"]] + [("tsv_m", "projection", True)]
               + [(m, "none", False) for m in AGNOSTIC])
    for c in cfgs:
        assert (c["backbone"]["name"], c["suite"]["name"], c["endpoints"]["source"]) == ("tiny", "mini", "mini")
        assert c["backbone"]["pretrained"] is None
        assert c["logger"]["group"] == "main_table_mini"


def test_main_table_mini_on_eight_tasks():
    """`+experiment=main_table_mini suite=mini8` (README, "The mini benchmark on 8 tasks"): the command line's suite
    wins over the preset's, every job runs the 8 tasks with mini8's own fixed coefficients."""
    cfgs = _compose_all(_jobs("main_table_mini", ["suite=mini8"]))
    assert len(cfgs) == PER_COL
    for c in cfgs:
        assert (c["suite"]["name"], len(c["suite"]["tasks"]), c["endpoints"]["source"]) == ("mini8", 8, "mini")
        if c["method"]["name"] in ("task_arithmetic", "ties", "consensus", "iso_c", "iso_cts") and \
                c["method"]["alpha_protocol"] == "fixed":
            assert c["method"]["alpha"] == pytest.approx(float(_mini8_alpha(c["method"]["name"])))


def _mini8_alpha(method: str) -> float:
    fixed = OmegaConf.load(CONF / "suite" / "mini8.yaml").fixed_alpha[method]
    return fixed["tiny"] if isinstance(fixed, dict) or OmegaConf.is_dict(fixed) else fixed


def test_router_ablation_changes_one_knob_per_row():
    cfgs = _compose_all(_jobs("router_ablation"))
    assert len(cfgs) == 3 * 14
    assert {c["backbone"]["name"] for c in cfgs} == {"ViT-L-14"}
    assert {c["suite"]["name"] for c in cfgs} == set(SUITES)
    assert {c["method"]["name"] for c in cfgs} == {"tsv_m"}
    default = _summary(next(c for c in cfgs if c["router"]["name"] == "projection" and c["suite"]["name"] == "8"))[4]
    assert default == {"mode": "topk", "threshold": 0.2, "max_tasks": 3, "head_selection": "max", "oracle_head": False,
                       "oracle_routing": False, "first_pass": "merged", "redundancy_eps": None, "batched": False,
                       "block": 20}
    diffs = set()
    for c in cfgs:
        if c["suite"]["name"] != "8":
            continue
        knobs = _summary(c)[4]
        changed = tuple(sorted((k, v) for k, v in knobs.items() if default[k] != v))
        diffs.add((c["router"]["name"], changed))
    assert diffs == {
        ("projection", ()),
        ("projection", (("head_selection", "avg"),)),
        ("projection", (("oracle_head", True),)),
        ("oracle", (("oracle_routing", True),)),
        ("projection", (("mode", "top1"),)),
        ("projection", (("threshold", 0.05),)),
        ("projection", (("threshold", 0.1),)),
        ("projection", (("threshold", 0.3),)),
        ("projection", (("threshold", 0.5),)),
        ("projection", (("mode", "weighted"),)),
        ("projection", (("redundancy_eps", 0.3),)),
        ("projection", (("first_pass", "zeroshot"),)),
        ("nearest_neighbour", (("mode", "top1"),)),
        ("mlp", ()),
    }
    nn_cfg = next(c for c in cfgs if c["router"]["name"] == "nearest_neighbour")["router"]
    assert (nn_cfg["split"], nn_cfg["samples_per_task"]) == ("train", 32)
    mlp_cfg = next(c for c in cfgs if c["router"]["name"] == "mlp")["router"]
    assert mlp_cfg["split"] == "train" and mlp_cfg["train"]["lr"] == 1e-5 and mlp_cfg["train"]["max_epochs"] == 80


def test_router_ablation_on_the_mini_suite():
    cfgs = _compose_all(_jobs("router_ablation", ["backbone=tiny", "suite=mini"]))
    assert len(cfgs) == 14 and {(c["backbone"]["name"], c["suite"]["name"]) for c in cfgs} == {("tiny", "mini")}
    assert {c["router"]["block"] for c in cfgs} == {2}  # the default tiny tower (4 blocks) routes on block 2


def test_batched_routing():
    cfgs = _compose_all(_jobs("batched_routing"))
    assert sorted((c["backbone"]["name"], c["suite"]["name"]) for c in cfgs) == \
        sorted((b, s) for b in BACKBONES for s in SUITES)
    for c in cfgs:
        assert (c["method"]["name"], c["router"]["name"], c["router"]["batched"]) == ("tsv_m", "batched_projection", True)
        assert c["eval"]["batch_size"] == 32 and c["logger"]["group"] == "batched_routing"


def test_routing_block_sweep():
    cfgs = _compose_all(_jobs("routing_block_sweep"))
    assert sorted((c["suite"]["name"], c["router"]["block"]) for c in cfgs) == \
        sorted((s, b) for s in SUITES for b in range(12))
    assert {(c["backbone"]["name"], c["method"]["name"], c["router"]["name"]) for c in cfgs} == \
        {("ViT-B-32", "tsv_m", "projection")}
    mini = _compose_all(_jobs("routing_block_sweep", ["backbone=tiny", "suite=mini", "router.block=range(0,4)"]))
    assert sorted(c["router"]["block"] for c in mini) == list(range(4))


def test_sweep_dirs_are_per_preset():
    for preset in ("main_table", "main_table_mini", "main_table_validated", "router_ablation", "batched_routing",
                   "routing_block_sweep"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
        assert f"/multiruns/{preset}/" in OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]


def test_main_config_composes_without_a_launcher_plugin():
    """The SLURM launcher config is opt-in: the default config must not need hydra-submitit-launcher."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=main_table"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")


def test_slurm_launcher_config_composes_when_the_plugin_is_installed(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=main_table", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    resolved = {k: cfg.hydra.launcher[k] for k in ("partition", "account", "gpus_per_node", "tasks_per_node",
                                                     "timeout_min", "mem_gb", "cpus_per_task")}
    assert resolved["partition"] == "gpu" and resolved["account"] is None
    assert resolved["gpus_per_node"] == 1 and resolved["tasks_per_node"] == 1
    assert isinstance(resolved["timeout_min"], int) and isinstance(resolved["mem_gb"], int)


def test_main_table_validated_chooses_every_coefficient_on_validation():
    jobs = _jobs("main_table_validated", ["backbone=ViT-B-32", "suite='8'"])
    cfgs = _compose_all(jobs)
    rows = {(c["method"]["name"], c["router"]["name"], c["eval"]["task_known"]): c["method"] for c in cfgs}
    assert len(cfgs) == 17 and len(rows) == 17
    validated = ("task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts")
    for m in validated:
        for known in (True, False):  # the task-agnostic rows choose alpha on validation too
            method = rows[(m, "none", known)]
            assert method["alpha_protocol"] == "validation" and method["alpha_grid"], (m, known)
    assert rows[("consensus", "none", True)]["lambda_protocol"] == "validation"
    assert rows[("consensus", "none", False)]["lambda_protocol"] == "validation"
    assert rows[("tsv_m", "projection", True)]["alpha_protocol"] == "fixed"  # MASS keeps alpha = 1
    assert {k for k in rows if not k[2]} == {(m, "none", False) for m in ("zeroshot", *validated)}
    assert len({c["run_name"] for c in cfgs}) == len(cfgs)
    assert {c["logger"]["group"] for c in cfgs} == {"main_table_validated"}
    assert len(_jobs("main_table_validated")) == 3 * 3 * 17
