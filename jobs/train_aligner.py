"""Train the aligner: consistency training (L = w_ar*L_AR + w_con*L_Con) with Ray Train + DeepSpeed.

    python -m jobs.train_aligner data.train_path=outputs/states/train.parquet run.name=my-aligner [key=value ...]
    python -m jobs.train_aligner config=conf/train_aligner_cpu.yaml          # the CPU recipe
    ray job submit --working-dir . -- python -m jobs.train_aligner ray.address=auto train.num_workers=8 \
        train.use_gpu=true deepspeed.zero_stage=3 deepspeed.precision=bf16 ...
    python -m jobs.train_aligner --help                                       # every key, default, meaning

Input: the Parquet written by `jobs.build_states` (`messages`, `states` worst -> best with the target last).
Each optimizer step draws, per prompt, one worse state y(t) (seeded by the row id and the epoch) and trains
the model to map it to the target in one pass (`pipeline/training/consistency.py`, the examples in
`pipeline/training/examples.py`). Ray Data shards the rows to the workers; DeepSpeed runs inside
`train_loop_per_worker` (gloo and ZeRO 0-2 on CPU, any stage on GPU).

Outputs under `run.storage_path/run.name/`: Ray Train checkpoints (DeepSpeed state: model, optimizer,
scheduler, step) every `train.checkpoint_every` steps, `metrics.jsonl` (loss terms, lr, tokens/s per step),
`loss.png`, `summary.json` and the final aligner in `aligner/` (`save_pretrained` + tokenizer), which the
engine, the batch job and the Serve app load by path. Rerunning with the same `run.name` resumes from the
last checkpoint: same step count, and the loss goes on from there.
"""
from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from jobs.common.config import (ConfigError, RayCfg, Section, expand, load_config, missing_local_model, resolve_path,
                                to_yaml)
from jobs.common.runtime import init_ray, run_job
from pipeline.training.consistency import Example, collate, losses, make_example
from pipeline.training.deepspeed_config import deepspeed_config
from pipeline.training.examples import EXAMPLE_KINDS, as_states, good_trajectories, row_example
from pipeline.training.lora import merged, with_lora
from pipeline.training.schedule import SCHEDULES, lr_lambda


# ---- config schema ---------------------------------------------------------------------------------------
class DataCfg(Section):
    """The training rows: the Parquet `jobs.build_states` writes."""
    train_path: str = Field("outputs/build_states/train.parquet", description="written by python -m jobs.build_states")
    limit: Optional[int] = Field(None, ge=1, description="first N prompts only")
    max_answer_tokens: int = Field(256, ge=2, description="target (and state) tokens per example, stop token "
                                                          "included; longer answers are cut")
    max_prompt_tokens: int = Field(768, ge=1, description="examples with longer prompts are skipped (counted)")
    examples: Literal[EXAMPLE_KINDS] = Field("states", description="states | trajectories (CLLM: Jacobi states -> "
                                                                   "fixed point) | mixed (a seeded coin per prompt "
                                                                   "and epoch)")

    def check(self) -> list[str]:
        if not resolve_path(self.train_path).exists():
            return [f"train_path: {self.train_path} not found (write it with python -m jobs.build_states)"]
        return []


class StartModelCfg(Section):
    """The model training starts from, and how it is trained."""
    path: str = Field("default", description='"default" (SmolLM2-135M-Instruct), an HF folder, a .gguf or a hub id')
    trust_remote_code: bool = False
    in_context: bool = Field(False, description="train for draft-in-context mode (the state is also shown in the "
                                                "prompt)")
    template: Optional[str] = Field(None, description="correction template with {question} and {draft} for "
                                                      "in_context; null = the built-in one")
    gradient_checkpointing: bool = False

    def check(self) -> list[str]:
        from pipeline.prompts import check_template

        problems = []
        if missing_local_model(self.path):
            problems.append(f"path: not found: {self.path}")
        if self.template is not None:
            try:
                check_template(self.template)
            except ValueError as e:
                problems.append(f"template: {e}")
        return problems


class LoraCfg(Section):
    """LoRA adapters (peft): with r > 0 only they train, and the export merges them into the weights."""
    r: int = Field(0, ge=0, description="LoRA rank; 0 = train every weight (full fine-tuning)")
    alpha: float = Field(32.0, gt=0, description="adapter update scale alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str = Field("all-linear", description="peft's name for every linear layer but the output head, "
                                                          "or a comma-separated list (e.g. q_proj,v_proj)")


class LossCfg(Section):
    """L = w_ar * L_AR + w_con * L_Con + w_kd * L_KD (pipeline/training/consistency.py)."""
    w_ar: float = Field(1.0, ge=0)
    w_con: float = Field(1.0, ge=0, description="the DiffPO paper states 1000 on L_Con; CLLM's code used "
                                                "10*L_AR + 1*L_Con")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    teacher: Literal["self", "initial"] = Field(
        "self", description="consistency targets: self (the model being trained, detached; CLLM) | initial (a "
                            "frozen copy of model.path, which also gives L_KD; one more forward pass per step)")
    w_kd: float = Field(0.0, ge=0, description="L_KD weight: soft cross-entropy from the initial model on the "
                                               "target (needs teacher=initial)")
    con_horizon: Optional[int] = Field(None, ge=1, description="L_Con over the first N positions after the common "
                                                               "prefix; null = all (CLLM)")

    def check(self) -> list[str]:
        problems = []
        if self.w_ar + self.w_con + self.w_kd == 0:
            problems.append("w_ar, w_con and w_kd: must not all be 0")
        if self.w_kd > 0 and self.teacher != "initial":
            problems.append("w_kd: L_KD distils from the initial model; set loss.teacher=initial (or w_kd=0)")
        return problems


class OptimCfg(Section):
    """AdamW and the learning-rate schedule (pipeline/training/schedule.py)."""
    lr: float = Field(2.0e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal[SCHEDULES] = Field("cosine", description="after warm-up: cosine | linear | constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="where cosine and linear end, as a fraction of lr")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip (0 = none)")


class DeepSpeedCfg(Section):
    """The DeepSpeed engine each worker trains in (pipeline/training/deepspeed_config.py)."""
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="0-2 on CPU (gloo); 3 needs GPUs")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 needs GPUs")
    micro_batch: int = Field(2, ge=1, description="examples per worker per forward")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    offload_optimizer: bool = Field(False, description="ZeRO-2/3: keep the optimizer state in CPU memory (GPU runs)")
    bucket_size: int = Field(50_000_000, ge=1, description="ZeRO reduce / all-gather bucket in elements (DeepSpeed's "
                                                           "default 5e8 allocates a 2 GB fp32 buffer per rank)")

    def engine_config(self, grad_clip: float) -> dict:
        """The dict `deepspeed.initialize(config=...)` takes."""
        return deepspeed_config(**self.model_dump(), grad_clip=grad_clip)


class TrainCfg(Section):
    """The Ray Train run: workers, length, checkpoints."""
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; null = epochs over the data")
    checkpoint_every: int = Field(20, ge=1, description="steps between checkpoints (rerun with the same run.name "
                                                        "to resume)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, description="seeds the torch RNG and every example's draw (with the row id and epoch)")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.8, gt=0, description="leave some CPU free for Ray Data's read tasks")
    torch_threads: int = Field(1, ge=1, description="torch threads per worker")
    max_failures: int = Field(0, ge=-1, description="worker failures Ray Train recovers from (from the last "
                                                    "checkpoint); -1 = no limit")


class RunCfg(Section):
    """Where the run's outputs go: `storage_path/name/`."""
    name: str = Field("aligner", pattern=r"^[^/]+$", description="a plain name; rerunning a name resumes it")
    storage_path: str = Field("outputs/train", description="checkpoints, metrics.jsonl, loss.png, summary.json, "
                                                           "aligner/ (shared storage on a multi-node cluster)")
    export: bool = Field(True, description="write the final model to <storage_path>/<name>/aligner")


class TrainAlignerConfig(Section):
    data: DataCfg = Field(default_factory=DataCfg)
    model: StartModelCfg = Field(default_factory=StartModelCfg)
    lora: LoraCfg = Field(default_factory=LoraCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    deepspeed: DeepSpeedCfg = Field(default_factory=DeepSpeedCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    run: RunCfg = Field(default_factory=RunCfg)
    ray: RayCfg = Field(default_factory=RayCfg)

    def check(self) -> list[str]:
        problems = []
        if self.lora.r > 0 and self.deepspeed.zero_stage == 3:
            problems.append("lora: adapters are not supported with deepspeed.zero_stage=3 (the export cannot merge "
                            "partitioned weights); LoRA's optimizer state is small, use ZeRO 0-2")
        if not self.train.use_gpu and self.deepspeed.zero_stage == 3:
            problems.append("deepspeed.zero_stage=3 needs GPUs (train.use_gpu=true); use 0-2 on CPU")
        if not self.train.use_gpu and self.deepspeed.precision == "fp16":
            problems.append("deepspeed.precision=fp16 needs GPUs; use fp32 (or bf16) on CPU")
        return problems


# ---- the workers ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunPlan:
    """What the driver works out for the workers."""
    total_steps: int  # optimizer steps of the whole run (resumed runs included)
    run_dir: Path  # storage_path/name: metrics.jsonl and aligner/ go here


@dataclass
class Position:
    """Where training stands; saved with every checkpoint (trainer_state.json) and resumed from."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already trained on


@dataclass
class Trainee:
    """One worker's training state."""
    engine: Any  # the DeepSpeed engine around the model (LoRA-wrapped when lora.r > 0), optimizer and schedule
    scheduler: Any
    tokenizer: Any
    reference: Any  # the frozen initial model (loss.teacher=initial), else None
    device: Any
    stop_id: int
    pad_id: int


class StepMeter:
    """Sums the loss terms and tokens of one optimizer step's micro-batches, and counts the examples skipped
    over the whole run; `metrics()` closes the step."""
    TERMS = ("loss", "l_ar", "l_con", "l_kd")

    def __init__(self, grad_accum: int, world: int):
        self.grad_accum, self.world, self.skipped = grad_accum, world, 0
        self._start_step()

    def _start_step(self) -> None:
        self.sums, self.tokens, self.t0 = dict.fromkeys(self.TERMS, 0.0), 0, time.perf_counter()

    def add(self, terms: dict[str, float], tokens: int, skipped: int) -> None:
        for k in self.TERMS:
            self.sums[k] += terms[k]
        self.tokens += tokens
        self.skipped += skipped

    def metrics(self, step: int, epoch: int, lr: float) -> dict:
        """The step's row of metrics.jsonl: loss terms averaged over its micro-batches, time, throughput of
        all ranks (this rank's tokens x world size)."""
        dt = time.perf_counter() - self.t0
        out = {"step": step, "epoch": epoch, **{k: v / self.grad_accum for k, v in self.sums.items()}, "lr": lr,
               "step_s": round(dt, 3), "tokens_per_s": round(self.tokens * self.world / dt, 1),
               "skipped": self.skipped}
        self._start_step()
        return out


def train_loop_per_worker(cfg: TrainAlignerConfig, plan: RunPlan) -> None:
    """One Ray Train worker: set up the engine, resume from the last checkpoint if any, train to
    `plan.total_steps` optimizer steps, export the aligner."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainee = set_up(cfg, plan.total_steps)
    start = resume(trainee.engine, rank)
    log_path = plan.run_dir / "metrics.jsonl"
    if rank == 0:
        drop_logged_after(log_path, start.step)
    train(cfg, trainee, start, plan.total_steps, log_path, rank, world)
    if cfg.run.export:
        export(trainee.engine, trainee.tokenizer, plan.run_dir / "aligner", cfg.deepspeed.zero_stage, rank)


def set_up(cfg: TrainAlignerConfig, total_steps: int) -> Trainee:
    """This worker's model (float32, LoRA-wrapped when lora.r > 0), its frozen copy as the reference
    (loss.teacher=initial), AdamW over the trainable weights and the LR schedule, in one DeepSpeed engine."""
    import deepspeed
    import ray.train.torch
    import torch

    from pipeline.models import load_model

    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    m = cfg.model
    lm = load_model(m.path, device=str(device), dtype="float32", trust_remote_code=m.trust_remote_code)
    model = lm.model
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.loss.teacher == "initial" else None
    model.config.use_cache = False
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.r > 0:
        model = with_lora(model, **cfg.lora.model_dump(), gradient_checkpointing=m.gradient_checkpointing)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=o.lr, betas=o.betas,
                            weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.schedule, o.warmup_steps, o.min_lr_ratio, total_steps))
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=cfg.deepspeed.engine_config(o.grad_clip))
    tok, stop_id = lm.tokenizer, lm.stop_ids[0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_id
    return Trainee(engine, sched, tok, reference, device, stop_id, pad_id)


def resume(engine, rank: int) -> Position:
    """Load the run's last checkpoint into `engine`, if there is one; where it left off."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return Position()
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag="state")
        at = Position(**json.loads((Path(d) / "trainer_state.json").read_text()))
    if rank == 0:
        print(f"[train_aligner] resumed from step {at.step} (epoch {at.epoch}, {at.micro_in_epoch} micro-batches "
              "in)", flush=True)
    return at


def drop_logged_after(log_path: Path, step: int) -> None:
    """Forget the steps metrics.jsonl logged after the checkpoint this run resumes from."""
    if log_path.exists():
        kept = [x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        log_path.write_text("".join(k + "\n" for k in kept))


def micro_batches(cfg: TrainAlignerConfig, start: Position):
    """(epoch, micro-batch number in the epoch, rows) over this worker's shard, epoch after epoch from
    `start`, leaving out the micro-batches the resumed checkpoint already trained on."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start.epoch, cfg.train.epochs):
        batches = shard.iter_batches(batch_size=cfg.deepspeed.micro_batch, batch_format="pandas")
        for micro, batch in enumerate(batches, 1):
            if epoch == start.epoch and micro <= start.micro_in_epoch:
                continue
            yield epoch, micro, batch.to_dict("records")


def batch_examples(rows: list[dict], epoch: int, cfg: TrainAlignerConfig,
                   t: Trainee) -> tuple[list[Example], float, int]:
    """(examples, loss weight, examples skipped) of one micro-batch. Prompts longer than
    data.max_prompt_tokens are skipped; a micro-batch left empty trains on a dummy example with weight 0,
    which keeps every rank taking the same steps."""
    from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE

    d, m = cfg.data, cfg.model
    make = functools.partial(row_example, tokenizer=t.tokenizer, stop_id=t.stop_id, pad_id=t.pad_id, kind=d.examples,
                             seed=cfg.train.seed, max_answer_tokens=d.max_answer_tokens, in_context=m.in_context,
                             template=m.template or DEFAULT_CORRECTION_TEMPLATE)
    examples = [make(r, epoch) for r in rows]
    kept = [ex for ex in examples if len(ex.prompt_ids) <= d.max_prompt_tokens]
    if not kept:
        dummy = make_example(t.tokenizer, [{"role": "user", "content": "hi"}], "hi", "hi", t.stop_id, t.pad_id, 4)
        return [dummy], 0.0, len(examples)
    return kept, 1.0, len(examples) - len(kept)


def micro_step(t: Trainee, lc: LossCfg, examples: list[Example], weight: float) -> tuple[dict[str, float], int]:
    """Forward and backward on one micro-batch, then the engine's step (an optimizer step at the end of a
    gradient-accumulation cycle). Returns the loss terms and the tokens both sequences covered."""
    b = {k: v.to(t.device) for k, v in collate(examples, t.pad_id, lc.con_horizon).items()}
    l_ar, l_con, l_kd = losses(t.engine, b, lc.label_smoothing, t.reference)
    loss = weight * (lc.w_ar * l_ar + lc.w_con * l_con + lc.w_kd * l_kd)
    t.engine.backward(loss)
    t.engine.step()
    terms = {"loss": loss.item(), "l_ar": l_ar.item(), "l_con": l_con.item(), "l_kd": l_kd.item()}
    return terms, int(b["attention_mask"].sum()) * 2


def train(cfg: TrainAlignerConfig, t: Trainee, start: Position, total_steps: int, log_path: Path, rank: int,
          world: int) -> None:
    """Optimizer steps from `start` to `total_steps`, each logged and reported to Ray Train, with a checkpoint
    every train.checkpoint_every steps, at the last step, and when the data run out first."""
    import ray.train

    step, saved, metrics = start.step, start.step, None
    meter = StepMeter(cfg.deepspeed.grad_accum, world)
    if step < total_steps:
        for epoch, micro, rows in micro_batches(cfg, start):
            examples, weight, skipped = batch_examples(rows, epoch, cfg, t)
            meter.add(*micro_step(t, cfg.loss, examples, weight), skipped)
            if not t.engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            metrics = meter.metrics(step, epoch, t.scheduler.get_last_lr()[0])
            if rank == 0:
                log_step(log_path, metrics, total_steps)
            if step % cfg.train.checkpoint_every == 0 or step >= total_steps:
                checkpoint(t.engine, metrics, Position(step, epoch, micro), rank)
                saved = step
            else:
                ray.train.report(metrics)
            if step >= total_steps:
                break
    if step > saved:
        checkpoint(t.engine, metrics, Position(step, cfg.train.epochs, 0), rank)


def log_step(log_path: Path, metrics: dict, total_steps: int) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    print(f"[train_aligner] step {metrics['step']}/{total_steps} loss {metrics['loss']:.4f} "
          f"(ar {metrics['l_ar']:.4f}, con {metrics['l_con']:.4f}, kd {metrics['l_kd']:.4f}) lr {metrics['lr']:.2e} "
          f"{metrics['tokens_per_s']:.0f} tok/s", flush=True)


def checkpoint(engine, metrics: dict, at: Position, rank: int) -> None:
    """Report `metrics` with a Ray Train checkpoint: every rank's shard of the DeepSpeed state, and `at`."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state")
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps(asdict(at)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def export(engine, tokenizer, out: Path, zero_stage: int, rank: int) -> None:
    """Write the trained model and its tokenizer to `out` as a plain HF folder (LoRA adapters merged in)."""
    if zero_stage == 3:  # parameters are partitioned: every rank takes part in gathering them
        engine.save_16bit_model(str(out), "pytorch_model.bin")
        if rank == 0:
            engine.module.config.save_pretrained(out)
            tokenizer.save_pretrained(out)
        return
    if rank != 0:
        return
    if out.exists():
        shutil.rmtree(out)
    model = merged(engine.module)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"[train_aligner] final aligner written to {out}", flush=True)


# ---- driver -----------------------------------------------------------------------------------------------
def training_rows(cfg: TrainAlignerConfig):
    """The rows to train on (materialized) and their count: the columns the example kind needs, only rows
    that can give an example, the first data.limit of them."""
    import ray.data

    d = cfg.data
    columns = ["id", "messages", "states"] + (["trajectories"] if d.examples != "states" else [])
    ds = ray.data.read_parquet(str(resolve_path(d.train_path)))
    if "trajectories" in columns and "trajectories" not in ds.schema().names:
        raise ConfigError([f"data.examples={d.examples}: {d.train_path} has no trajectories "
                           "(write them with python -m jobs.build_states trajectory.enabled=true)"])
    ds = ds.select_columns(columns)
    if d.examples == "trajectories":
        ds = ds.filter(lambda r: len(good_trajectories(r["trajectories"])) > 0)
    else:
        ds = ds.filter(lambda r: len(as_states(r["states"])) >= 2)
    if d.limit:
        ds = ds.limit(d.limit)
    ds = ds.materialize()
    n_rows = ds.count()
    if n_rows == 0 and d.examples == "trajectories":
        raise ConfigError([f"data.train_path: no rows with a trajectory in {d.train_path} (write them with "
                           "python -m jobs.build_states trajectory.enabled=true)"])
    if n_rows == 0:
        raise ConfigError([f"data.train_path: no rows with >= 2 states in {d.train_path}"])
    return ds, n_rows


def total_steps(n_rows: int, per_step: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: `epochs` passes over the rows (at least one step each), or fewer."""
    all_epochs = max(1, n_rows // per_step) * epochs
    return min(max_steps or all_epochs, all_epochs)


def make_trainer(cfg: TrainAlignerConfig, plan: RunPlan, ds):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    return TorchTrainer(
        functools.partial(train_loop_per_worker, cfg, plan),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=str(plan.run_dir.parent),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
        datasets={"train": ds},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(log_path)] if log_path.exists() else []
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [r["l_ar"] for r in rows], label="L_AR")
    ax[0].plot(steps, [r["l_con"] for r in rows], label="L_Con")
    if any(r.get("l_kd") for r in rows):
        ax[0].plot(steps, [r["l_kd"] for r in rows], label="L_KD")
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[0].set_title("loss terms")
    ax[1].plot(steps, [r["lr"] for r in rows], color="gray")
    ax[1].set_xlabel("optimizer step")
    ax[1].set_title("learning rate")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(TrainAlignerConfig, "conf/train_aligner.yaml", argv)
    print("[train_aligner] resolved config:\n" + to_yaml(cfg), flush=True)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_to_driver=True,
             extra_env={"DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu"})
    run_dir = Path(expand(cfg.run.storage_path)).resolve() / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    ds, n_rows = training_rows(cfg)
    per_step = cfg.deepspeed.micro_batch * cfg.deepspeed.grad_accum * cfg.train.num_workers
    plan = RunPlan(total_steps(n_rows, per_step, cfg.train.epochs, cfg.train.max_steps), run_dir)
    print(f"[train_aligner] {n_rows} prompts, {per_step} examples per step, {plan.total_steps} optimizer steps",
          flush=True)

    t0 = time.perf_counter()
    result = make_trainer(cfg, plan, ds).fit()
    wall = time.perf_counter() - t0
    log_path = run_dir / "metrics.jsonl"
    plot_losses(log_path, run_dir / "loss.png")
    rows = [json.loads(x) for x in open(log_path)] if log_path.exists() else []
    summary = {
        "prompts": n_rows, "optimizer_steps": plan.total_steps, "steps_logged": len(rows), "wall_s": round(wall, 1),
        "first": rows[0] if rows else None, "last": rows[-1] if rows else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "aligner": str(run_dir / "aligner") if cfg.run.export else None,
        "metrics": str(log_path), "loss_png": str(run_dir / "loss.png"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[train_aligner] summary:\n" + json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    run_job("train_aligner")
