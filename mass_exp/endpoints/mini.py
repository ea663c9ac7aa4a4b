"""The mini suite's own assets: generated datasets, a pretrained tiny CLIP and one fine-tuned endpoint per task.

Everything is cached under `cache_dir`, keyed by a hash of what determines it, and built only when missing:
data <- generator settings; pretrained CLIP <- architecture + every task's data + pretraining settings;
endpoint <- pretrained CLIP + its task's data + fine-tuning settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mass_exp.data.datasets import ImageClassificationDataset, build_mini_task, load_split, mini_dataset_key
from mass_exp.data.mini import get_mini_task, signed_mask
from mass_exp.data.tasks import TaskSpec
from mass_exp.finetune.linearized import LinearizedModel
from mass_exp.finetune.modules import ContrastivePretrainModule, FinetuneModule
from mass_exp.models.clip import create_clip
from mass_exp.models.heads import build_zeroshot_head
from mass_exp.utils.io import load_tensors, save_tensors, stable_hash

log = logging.getLogger(__name__)

OPENAI_LOGIT_SCALE = math.log(100.0)
# which image-tower parameters a fine-tune trains (endpoints.finetune.trainable); attention-only after Jin et al. 2024
# "attention_mlp_in" adds the MLPs' input layers (mlp.c_fc), whose task vectors MASS's router projects onto
TRAINABLE = {"all": lambda name: True, "attention": lambda name: ".attn." in name,
             "attention_mlp_in": lambda name: ".attn." in name or ".mlp.c_fc." in name}


@dataclass(frozen=True)
class MiniAssets:
    data_dirs: dict[str, Path]
    pretrained_file: Path  # full CLIP state dict (both towers)
    pretrained_key: str
    endpoint_files: dict[str, Path]  # image-tower state dicts
    endpoint_keys: dict[str, str]


class _CaptionedImages(Dataset):
    """Pretraining pairs: an image and one of its task's templates filled with its class name, drawn at random.

    A signed image (one that carries its task's visual domain) is captioned with its class only with probability
    `class_caption_share`, else with a caption that tells its domain but not its class: pretraining then learns every
    task's domain without learning its classes on it, which keeps zero-shot accuracy low. `domain_tokens` holds the
    candidate domain captions of each task ((variants, context) per task), one drawn at random: the task's domain
    caption (`domain_captions=caption`), or its templates filled with a class of the task drawn uniformly, whatever
    the image shows (`templates`), so that the zero-shot heads' own prompts learn the domain and nothing of the class.
    """

    def __init__(self, parts: Sequence[tuple[ImageClassificationDataset, int, int, Any]], tokens: torch.Tensor,
                 domain_tokens: Sequence[torch.Tensor], class_caption_share: float, seed: int):
        self.items = [(ds, offset, task, bool(signed[i]), i) for ds, offset, task, signed in parts for i in range(len(ds))]
        self.tokens = tokens  # (num global classes, num templates, context)
        self.domain_tokens = list(domain_tokens)  # per task: (variants, context)
        self.class_caption_share = class_caption_share
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        ds, offset, task, signed, i = self.items[idx]
        image, label = ds[i]
        if signed and self.class_caption_share < 1 and float(torch.rand((), generator=self.gen)) >= self.class_caption_share:
            choices = self.domain_tokens[task]
            # a single caption draws nothing, so the random stream (and the weights) of `caption` stay as before
            v = int(torch.randint(len(choices), (1,), generator=self.gen)) if len(choices) > 1 else 0
            return image, choices[v], self.tokens.shape[0] + task  # one positive id per domain
        g = offset + label
        t = int(torch.randint(self.tokens.shape[1], (1,), generator=self.gen))
        return image, self.tokens[g, t], g


def domain_caption_tokens(tasks: Sequence[TaskSpec], tokens: torch.Tensor, tokenizer, mode: str) -> list[torch.Tensor]:
    """Each task's candidate captions for signed images not captioned by class, as (variants, context) tokens.

    `caption`: the task's one domain caption (e.g. "stripes."). `templates`: every (class, template) prompt of the
    task, i.e. rows of `tokens` (num global classes, num templates, context); drawn uniformly, whatever the image
    shows, they carry the task's domain and no information on the class.
    """
    if mode == "templates":
        starts = itertools.accumulate([0] + [t.num_classes for t in tasks])
        return [tokens[o : o + t.num_classes].flatten(0, 1) for o, t in zip(starts, tasks)]
    if mode == "caption":
        return list(tokenizer([get_mini_task(t.name).domain_caption for t in tasks])[:, None])
    raise ValueError(f"endpoints.pretrain.domain_captions must be caption or templates, got {mode!r}")


def _trainer(trainer_cfg: Mapping[str, Any], max_steps: int = -1, max_epochs: int | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"), devices=1, max_steps=max_steps, max_epochs=max_epochs,
        logger=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=trainer_cfg.get("enable_progress_bar", True), deterministic=False,
    )


@contextlib.contextmanager
def patch_dropout(model: torch.nn.Module, prob: float) -> Iterator[None]:
    """Drop a share `prob` of the image tower's patch tokens (the class token kept) in training-mode forwards, for the
    duration of the block; every patch is seen again afterwards (`endpoints.pretrain.patch_dropout`)."""
    if prob <= 0:
        yield
        return
    from open_clip.transformer import PatchDropout

    model.visual.patch_dropout = PatchDropout(prob)
    try:
        yield
    finally:
        model.visual.patch_dropout = torch.nn.Identity()


def pretrain_tiny_clip(arch: str, tasks: Sequence[TaskSpec], data_dirs: Mapping[str, Path], cfg: Mapping[str, Any],
                       trainer_cfg: Mapping[str, Any], seed: int,
                       generator: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Contrastive pretraining of a randomly initialised CLIP on the tasks' `pretrain` splits (mostly plain images;
    `generator` tells which are signed, see `_CaptionedImages`)."""
    L.seed_everything(seed, verbose=False)
    model, preprocess, tokenizer = create_clip(arch, None)
    parts, offset, all_tokens = [], 0, []
    n_templates = max(len(t.templates) for t in tasks)
    gen = dict(generator or {})
    for k, task in enumerate(tasks):
        ds = ImageClassificationDataset(load_split(task, "pretrain", mini_dirs=dict(data_dirs)), preprocess)
        signed = (signed_mask(get_mini_task(task.name), "pretrain", len(ds), int(gen["seed"]),
                              float(gen["pretrain_signed_share"])) if gen else [False] * len(ds))
        parts.append((ds, offset, k, signed))
        offset += task.num_classes
        for cls in task.classnames:
            prompts = task.prompts(cls)
            prompts = (prompts * n_templates)[:n_templates]
            all_tokens.append(tokenizer(prompts))
    tokens = torch.stack(all_tokens)
    domain_tokens = domain_caption_tokens(tasks, tokens, tokenizer, str(cfg.get("domain_captions", "caption")))
    data = _CaptionedImages(parts, tokens, domain_tokens, float(cfg.get("class_caption_share", 1.0)), seed)
    loader = DataLoader(data, batch_size=int(cfg["batch_size"]), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    steps = int(cfg["steps"])
    module = ContrastivePretrainModule(model, float(cfg["lr"]), float(cfg["weight_decay"]), int(cfg["warmup_steps"]), steps)
    model.train()
    t0 = time.time()
    with patch_dropout(model, float(cfg.get("patch_dropout", 0.0))):
        _trainer(trainer_cfg, max_steps=steps).fit(module, loader)
    model.eval()
    with torch.no_grad():  # OpenAI CLIP's temperature; the frozen heads are scaled by it (MINI_BENCHMARK notes)
        model.logit_scale.fill_(OPENAI_LOGIT_SCALE)
    log.info("pretrained tiny CLIP: %d steps x %d pairs in %.1fs", steps, cfg["batch_size"], time.time() - t0)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def finetune_endpoint(arch: str, pretrained: Mapping[str, torch.Tensor], task: TaskSpec, data_dir: Path,
                      cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any], seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Fine-tune the image tower on one task with its frozen zero-shot head; returns (visual state dict, val acc)."""
    L.seed_everything(seed, verbose=False)
    model, preprocess, tokenizer = create_clip(arch, None)
    model.load_state_dict(pretrained)
    head = build_zeroshot_head(model, tokenizer, task)
    mini_dirs = {task.name: data_dir}
    train = ImageClassificationDataset(load_split(task, "train", mini_dirs=mini_dirs), preprocess)
    val = ImageClassificationDataset(load_split(task, "validation", mini_dirs=mini_dirs), preprocess)
    bs = int(cfg["batch_size"])
    train_loader = DataLoader(train, batch_size=bs, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=256)
    steps = int(cfg["epochs"]) * len(train_loader)
    visual = model.visual
    visual.train()
    trainable = str(cfg.get("trainable", "all"))
    if trainable not in TRAINABLE:
        raise ValueError(f"endpoints.finetune.trainable must be one of {sorted(TRAINABLE)}, got {trainable!r}")
    if cfg.get("linearized", False):  # train the tower's first-order expansion around θ_pre (tangent space)
        trained = LinearizedModel(visual, TRAINABLE[trainable])
    else:
        trained = visual
        for name, p in visual.named_parameters():
            p.requires_grad_(TRAINABLE[trainable](name))
    module = FinetuneModule(trained, head, float(cfg["lr"]), float(cfg["weight_decay"]), int(cfg["warmup_steps"]), steps)
    trainer = _trainer(trainer_cfg, max_epochs=int(cfg["epochs"]))
    trainer.fit(module, train_loader, val_loader)
    visual.eval()
    state = trained.endpoint_state_dict() if isinstance(trained, LinearizedModel) else visual.state_dict()
    for p in visual.parameters():
        p.requires_grad_(True)
    val_acc = float(trainer.callback_metrics.get("finetune/val_acc", torch.tensor(float("nan"))))
    return {k: v.detach().cpu() for k, v in state.items()}, val_acc


# recipe keys whose value here means "as before they existed": left out of the cache keys, so caches made before the
# keys were added stay valid (they produce the same weights)
NEUTRAL_RECIPE = {"class_caption_share": 1.0, "trainable": "all", "domain_captions": "caption", "patch_dropout": 0.0,
                  "linearized": False}


def _recipe(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A pretraining / fine-tuning recipe as it enters a cache key (neutral values of the newer keys left out)."""
    return {k: v for k, v in dict(cfg).items() if not (k in NEUTRAL_RECIPE and v == NEUTRAL_RECIPE[k])}


# `build_workers=auto` starts worker processes only for at least this many fine-tuning images in all (epochs x train
# size x missing endpoints): a spawned worker takes about 12 s to import its libraries on 2 busy cores, which a
# smaller build does not win back
PARALLEL_MIN_IMAGES = 20_000


def build_workers(setting: int | str, missing: int, trainer_cfg: Mapping[str, Any], images: int | None = None) -> int:
    """How many processes fine-tune the `missing` endpoints at once (`endpoints.build_workers`).

    `auto`: on CPU, one per intra-op thread torch may use (OMP_NUM_THREADS), at most one per missing endpoint, the
    threads split between them (on 2 cores the six default endpoints took 1.2-1.5x less time than one after the
    other on two threads; scripts/bench_build_workers.py measures the per-step ratio). 1 on a GPU (`auto` finds one,
    or trainer.accelerator asks for it), and 1 when the fine-tunes see fewer than PARALLEL_MIN_IMAGES training images
    in all (`images`).
    """
    if setting != "auto":
        return max(1, min(int(setting), missing))
    accel = str(trainer_cfg.get("accelerator", "auto"))
    if accel in ("gpu", "cuda", "mps", "tpu") or (accel == "auto" and torch.cuda.is_available()):
        return 1
    if images is not None and images < PARALLEL_MIN_IMAGES:
        return 1
    return max(1, min(torch.get_num_threads(), missing))


@dataclass(frozen=True)
class _FinetuneJob:
    arch: str
    pretrained_file: Path
    task: TaskSpec
    data_dir: Path
    cfg: dict
    trainer_cfg: dict
    seed: int
    out: Path
    key: str


def _run_finetune_job(job: _FinetuneJob, pretrained: Mapping[str, torch.Tensor] | None = None
                      ) -> tuple[str, float, float]:
    """Fine-tune one endpoint and write it atomically; returns (task, validation accuracy, seconds)."""
    t0 = time.time()
    pretrained = pretrained if pretrained is not None else load_tensors(job.pretrained_file)
    state, val_acc = finetune_endpoint(job.arch, pretrained, job.task, job.data_dir, job.cfg, job.trainer_cfg, job.seed)
    save_tensors(job.out, state, metadata={"kind": "mini-finetuned", "task": job.task.name, "key": job.key})
    return job.task.name, val_acc, time.time() - t0


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit device banners from every worker


def _finetune_all(jobs: Sequence[_FinetuneJob], workers: int) -> None:
    def done(task: str, val_acc: float, seconds: float) -> None:
        log.info("fine-tuned %s in %.1fs: validation accuracy %.1f%%", task, seconds, 100 * val_acc)

    if workers <= 1:
        pretrained = load_tensors(jobs[0].pretrained_file) if jobs else None
        for job in jobs:
            done(*_run_finetune_job(job, pretrained))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // workers)
    log.info("fine-tuning %d endpoints in %d processes of %d thread(s) each", len(jobs), workers, threads)
    quiet = [dataclasses.replace(j, trainer_cfg={**j.trainer_cfg, "enable_progress_bar": False}) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_run_finetune_job, j) for j in quiet]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc="fine-tuning endpoints", unit="task"):
                done(*f.result())  # a worker's error is raised here
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def prepare_mini_assets(arch: str, tasks: Sequence[TaskSpec], generator: Mapping[str, Any], pretrain: Mapping[str, Any],
                        finetune: Mapping[str, Any], trainer_cfg: Mapping[str, Any], cache_dir: str | Path,
                        seed: int = 0, workers: int | str = 1) -> MiniAssets:
    """Build whatever is missing of the mini suite (data, pretrained CLIP, endpoints) and return the cached files.

    `workers`: processes that fine-tune the missing endpoints side by side (`build_workers`); every endpoint is the
    same fine-tune (its seed, data and recipe) whichever process runs it.
    """
    cache = Path(cache_dir)
    gen = dict(generator)
    data_dirs = {t.name: build_mini_task(t.name, gen, cache / "data") for t in tasks}
    data_keys = {t.name: mini_dataset_key(t.name, gen) for t in tasks}

    pre_key = stable_hash({"arch": arch, "data": data_keys, "pretrain": _recipe(pretrain), "seed": seed})
    pre_file = cache / "mini" / f"pretrained-{arch}-{pre_key}.safetensors"
    if not pre_file.exists():
        log.info("pretraining the tiny CLIP (cache miss %s)", pre_file.name)
        save_tensors(pre_file, pretrain_tiny_clip(arch, tasks, data_dirs, pretrain, trainer_cfg, seed, gen),
                     metadata={"kind": "mini-pretrained", "key": pre_key})
    endpoint_files, endpoint_keys, jobs = {}, {}, []
    for i, task in enumerate(tasks):
        key = stable_hash({"pretrained": pre_key, "data": data_keys[task.name], "finetune": _recipe(finetune), "seed": seed})
        path = cache / "mini" / f"finetuned-{task.name}-{key}.safetensors"
        if not path.exists():
            jobs.append(_FinetuneJob(arch, pre_file, task, data_dirs[task.name], dict(finetune), dict(trainer_cfg),
                                     seed + 1 + i, path, key))
        endpoint_files[task.name], endpoint_keys[task.name] = path, key
    images = len(jobs) * int(finetune["epochs"]) * int(gen["train_size"])
    _finetune_all(jobs, build_workers(workers, len(jobs), trainer_cfg, images))
    return MiniAssets(data_dirs, pre_file, pre_key, endpoint_files, endpoint_keys)
