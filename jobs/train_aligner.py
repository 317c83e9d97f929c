"""Train the aligner: consistency training (L = w_ar*L_AR + w_con*L_Con) with Ray Train + DeepSpeed.

    python -m jobs.train_aligner data.train_path=outputs/states/train.parquet run.name=my-aligner [key=value ...]
    ray job submit --working-dir . -- python -m jobs.train_aligner ray.address=auto train.num_workers=8 \
        train.use_gpu=true deepspeed.zero_stage=3 deepspeed.precision=bf16 ...

Input: the Parquet written by `jobs.build_states` (`messages`, `states` worst -> best with the target last).
Each optimizer step draws, per prompt, one worse state y(t) (seeded by the row id and the epoch) and trains
the model to map it to the target in one pass (`pipeline/training/consistency.py`). Ray Data shards the rows to the
workers; DeepSpeed runs inside `train_loop_per_worker` (gloo and ZeRO 0-2 on CPU, any stage on GPU).

Outputs under `run.storage_path/run.name/`: Ray Train checkpoints (DeepSpeed state: model, optimizer,
scheduler, step) every `train.checkpoint_every` steps, `metrics.jsonl` (loss terms, lr, tokens/s per step),
`loss.png`, `summary.json` and the final aligner in `aligner/` (`save_pretrained` + tokenizer), which the
engine, the batch job and the Serve app load by path. Rerunning with the same `run.name` resumes from the
last checkpoint: same step count, and the loss goes on from there.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from jobs.config import REPO, ConfigError, RayCfg, expand, init_ray, load_config, run_job, to_yaml


EXAMPLE_KINDS = ("states", "trajectories", "mixed")  # what a row gives per epoch (data.examples)
TEACHERS = ("self", "initial")  # where the consistency targets come from (loss.teacher)


# ---- config ------------------------------------------------------------------------------------------
@dataclass
class DataCfg:
    train_path: str = "outputs/build_states/train.parquet"
    limit: Optional[int] = None  # first N prompts only
    max_answer_tokens: int = 256  # target (and state) tokens per example, stop token included
    max_prompt_tokens: int = 768  # longer prompts are skipped (counted)
    examples: str = "states"  # states | trajectories | mixed (a seeded coin per prompt and epoch)


@dataclass
class ModelCfg:
    path: str = "default"  # the model to start from: "default", an HF folder, a .gguf or a hub id
    trust_remote_code: bool = False
    in_context: bool = False  # train for draft-in-context mode (the state is also shown in the prompt)
    template: Optional[str] = None  # correction template for in_context (None: the built-in one)
    gradient_checkpointing: bool = False


@dataclass
class LoraCfg:
    r: int = 0  # LoRA rank; 0 = train every weight (full fine-tuning)
    alpha: float = 32.0  # update scale alpha / r
    dropout: float = 0.0
    target_modules: str = "all-linear"  # peft's name for every linear layer but the output head


@dataclass
class LossCfg:
    w_ar: float = 1.0
    w_con: float = 1.0  # the DiffPO paper states 1000 on L_Con; CLLM's code used 10*L_AR + 1*L_Con
    label_smoothing: float = 0.0
    teacher: str = "self"  # consistency targets: self (the model being trained, detached) | initial (a frozen
    # copy of model.path, which also gives L_KD; one more forward pass per step)
    w_kd: float = 0.0  # L_KD weight: soft cross-entropy from the initial model on the target (teacher=initial)
    con_horizon: Optional[int] = None  # L_Con over the first N positions after the common prefix; None = all


@dataclass
class OptimCfg:
    lr: float = 2.0e-5
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 5
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class DeepSpeedCfg:
    zero_stage: int = 2  # 0-2 on CPU (gloo); 3 needs GPUs
    precision: str = "fp32"  # fp32 | bf16 | fp16 (bf16/fp16 on GPU)
    micro_batch: int = 2  # examples per worker per forward
    grad_accum: int = 1
    offload_optimizer: bool = False  # ZeRO-2/3: keep optimizer state in CPU memory (GPU runs)
    bucket_size: int = 50_000_000  # ZeRO gradient-reduce / all-gather bucket, in elements (DeepSpeed's
    # own default, 5e8, allocates a 2 GB fp32 staging buffer per rank, more than a 135M model's states)


@dataclass
class TrainCfg:
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; None = epochs over the data
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.8  # leave CPU for Ray Data's read tasks
    torch_threads: int = 1
    max_failures: int = 0  # worker failures Ray Train recovers from (from the last checkpoint)


@dataclass
class RunCfg:
    name: str = "aligner"
    storage_path: str = "outputs/train"
    export: bool = True  # write the final model to <storage>/<name>/aligner


@dataclass
class TrainAlignerConfig:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    run: RunCfg = field(default_factory=RunCfg)
    ray: RayCfg = field(default_factory=RayCfg)


def validate(cfg) -> None:
    p = []
    if not Path(expand(cfg.data.train_path)).exists():
        p.append(f"data.train_path: {cfg.data.train_path} not found (write it with python -m jobs.build_states)")
    if cfg.data.examples not in EXAMPLE_KINDS:
        p.append(f"data.examples: {cfg.data.examples!r} is not one of {', '.join(EXAMPLE_KINDS)}")
    if cfg.data.max_answer_tokens < 2:
        p.append("data.max_answer_tokens: must be >= 2")
    lc = cfg.loss
    if min(lc.w_ar, lc.w_con, lc.w_kd) < 0 or lc.w_ar + lc.w_con + lc.w_kd == 0:
        p.append("loss: w_ar, w_con and w_kd must be >= 0 and not all 0")
    if lc.con_horizon is not None and lc.con_horizon < 1:
        p.append(f"loss.con_horizon: must be >= 1 or null (all positions), got {lc.con_horizon}")
    if lc.teacher not in TEACHERS:
        p.append(f"loss.teacher: {lc.teacher!r} is not one of {', '.join(TEACHERS)}")
    elif lc.w_kd > 0 and lc.teacher != "initial":
        p.append("loss.w_kd: L_KD distils from the initial model; set loss.teacher=initial (or w_kd=0)")
    if cfg.lora.r < 0 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1:
        p.append("lora: r must be >= 0 (0 = full fine-tuning), alpha > 0, dropout in [0, 1)")
    elif cfg.lora.r > 0 and cfg.deepspeed.zero_stage == 3:
        p.append("lora: adapters are not supported with deepspeed.zero_stage=3 (the export cannot merge "
                 "partitioned weights); LoRA's optimizer state is small, use ZeRO 0-2")
    if not 0 <= cfg.loss.label_smoothing < 1:
        p.append("loss.label_smoothing: must be in [0, 1)")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        p.append(f"optim.schedule: {cfg.optim.schedule!r} is not cosine, linear or constant")
    if cfg.optim.lr <= 0:
        p.append("optim.lr: must be > 0")
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage: {ds.zero_stage} is not 0, 1, 2 or 3")
    if ds.precision not in ("fp32", "bf16", "fp16"):
        p.append(f"deepspeed.precision: {ds.precision!r} is not fp32, bf16 or fp16")
    if not cfg.train.use_gpu and ds.zero_stage == 3:
        p.append("deepspeed.zero_stage=3 needs GPUs (train.use_gpu=true); use 0-2 on CPU")
    if not cfg.train.use_gpu and ds.precision == "fp16":
        p.append("deepspeed.precision=fp16 needs GPUs; use fp32 (or bf16) on CPU")
    if ds.bucket_size < 1:
        p.append("deepspeed.bucket_size: must be >= 1 (elements)")
    if ds.micro_batch < 1 or ds.grad_accum < 1:
        p.append("deepspeed.micro_batch and deepspeed.grad_accum must be >= 1")
    t = cfg.train
    if t.num_workers < 1 or t.epochs < 1 or t.checkpoint_every < 1:
        p.append("train.num_workers, train.epochs and train.checkpoint_every must be >= 1")
    if t.max_steps is not None and t.max_steps < 1:
        p.append("train.max_steps: must be >= 1 or null")
    if not cfg.run.name or "/" in cfg.run.name:
        p.append("run.name: must be a plain, non-empty name")
    if p:
        raise ConfigError(p)


# ---- pieces used inside the workers ------------------------------------------------------------------
def ds_config(cfg) -> dict:
    """The DeepSpeed config (optimizer and scheduler are passed as torch objects: no fused-op builds on CPU)."""
    ds = cfg["deepspeed"]
    zero = {"stage": ds["zero_stage"]}
    if ds["zero_stage"] >= 1:
        zero.update(reduce_bucket_size=int(ds["bucket_size"]), allgather_bucket_size=int(ds["bucket_size"]))
    if ds["zero_stage"] >= 2 and ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": ds["micro_batch"],
        "gradient_accumulation_steps": ds["grad_accum"],
        "gradient_clipping": cfg["optim"]["grad_clip"],
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ds["precision"] == "bf16"},
        "fp16": {"enabled": ds["precision"] == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg, total_steps: int):
    o = cfg["optim"]
    warm, floor = o["warmup_steps"], o["min_lr_ratio"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if o["schedule"] == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        if o["schedule"] == "linear":
            return 1.0 - (1.0 - floor) * frac
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def as_states(x) -> list[str]:
    """The `states` column: a list (build_states writes list<string>) or a JSON-encoded list."""
    return json.loads(x) if isinstance(x, str) else [str(s) for s in x]


def pick_state(row_id: str, epoch: int, seed: int, n_states: int) -> int:
    """Index of the worse state y(t) trained on for this row in this epoch (states[-1] is the target)."""
    return random.Random(f"{seed}:{row_id}:{epoch}").randrange(n_states - 1)


def good_trajectories(x) -> list[dict]:
    """The row's Jacobi trajectories (build_states' `trajectories` column) that can give an example."""
    trs = json.loads(x) if isinstance(x, str) and x else []
    return [t for t in trs if "error" not in t and len(t.get("state_ids", [])) >= 2]


def row_example(r: dict, epoch: int, config: dict, tok, stop_id: int, pad_id: int, template: str):
    """The example one row gives in one epoch: a ranked worse answer -> the target (DiffPO), or an
    intermediate Jacobi state -> the aligner's fixed point (CLLM); `data.examples` picks, seeded."""
    from pipeline.training.consistency import make_example, make_trajectory_example

    d, m, seed = config["data"], config["model"], config["train"]["seed"]
    states, msgs = as_states(r["states"]), json.loads(r["messages"])
    kind = d["examples"]
    if kind == "mixed":
        kind = "trajectories" if random.Random(f"{seed}:{r['id']}:{epoch}:kind").random() < 0.5 else "states"
    trs = good_trajectories(r.get("trajectories")) if kind == "trajectories" else []
    if trs:
        rng = random.Random(f"{seed}:{r['id']}:{epoch}:trajectory")
        tr = rng.choice(trs)
        k = rng.randrange(len(tr["state_ids"]) - 1)  # never the fixed point itself (nothing to learn)
        return make_trajectory_example(tok, msgs, tr["fixed_point_ids"], tr["stop"] == "eos", tr["state_ids"][k],
                                       stop_id, pad_id, d["max_answer_tokens"], m["in_context"],
                                       states[tr["from"]], template)
    t = pick_state(str(r["id"]), epoch, seed, len(states))
    return make_example(tok, msgs, states[-1], states[t], stop_id, pad_id, d["max_answer_tokens"],
                        m["in_context"], template)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    from pipeline.training.consistency import collate, losses, make_example
    from pipeline.models import load_model
    from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["train"]["torch_threads"])
    torch.manual_seed(config["train"]["seed"])
    use_gpu = config["train"]["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    m = config["model"]
    lm = load_model(m["path"], device=str(device), dtype="float32", trust_remote_code=m["trust_remote_code"])
    model, tok = lm.model, lm.tokenizer
    reference = None
    if config["loss"]["teacher"] == "initial":  # frozen: the targets and L_KD never move
        reference = copy.deepcopy(model).requires_grad_(False)
    model.config.use_cache = False
    if m["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    if config["lora"]["r"] > 0:
        model = with_lora(model, config["lora"], m["gradient_checkpointing"])
    model.train()
    stop_id = lm.stop_ids[0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_id
    template = m["template"] or DEFAULT_CORRECTION_TEMPLATE

    total_steps = config["_total_steps"]
    o = config["optim"]
    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config, total_steps))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=ds_config(config))

    step, epoch0, skip = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            state = json.loads((Path(d) / "trainer_state.json").read_text())
        step, epoch0, skip = state["step"], state["epoch"], state["micro_in_epoch"]
        if rank == 0:
            print(f"[train_aligner] resumed from step {step} (epoch {epoch0}, {skip} micro-batches in)", flush=True)

    run_dir = Path(config["_run_dir"])
    log_path = run_dir / "metrics.jsonl"
    if rank == 0 and log_path.exists():  # drop steps logged after the checkpoint we resume from
        kept = [x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        log_path.write_text("".join(k + "\n" for k in kept))
    last_ckpt, metrics, micro = step, None, 0
    shard = ray.train.get_dataset_shard("train")
    d, lw = config["data"], config["loss"]
    acc = {"loss": 0.0, "l_ar": 0.0, "l_con": 0.0, "l_kd": 0.0, "tokens": 0, "skipped": 0}
    t_step = time.perf_counter()
    done = step >= total_steps
    for epoch in range(epoch0, config["train"]["epochs"]):
        if done:
            break
        micro = 0
        for batch in shard.iter_batches(batch_size=config["deepspeed"]["micro_batch"], batch_format="pandas"):
            micro += 1
            if epoch == epoch0 and micro <= skip:
                continue  # consumed before the checkpoint this run resumed from
            examples = []
            for r in batch.to_dict("records"):
                ex = row_example(r, epoch, config, tok, stop_id, pad_id, template)
                if len(ex.prompt_ids) > d["max_prompt_tokens"]:
                    acc["skipped"] += 1
                    continue
                examples.append(ex)
            if not examples:  # keep the ranks in step: a dummy example with zero weight
                examples = [make_example(tok, [{"role": "user", "content": "hi"}], "hi", "hi", stop_id, pad_id, 4)]
                weight = 0.0
            else:
                weight = 1.0
            b = {k: v.to(device) for k, v in collate(examples, pad_id, lw["con_horizon"]).items()}
            l_ar, l_con, l_kd = losses(engine, b, lw["label_smoothing"], reference)
            loss = weight * (lw["w_ar"] * l_ar + lw["w_con"] * l_con + lw["w_kd"] * l_kd)
            engine.backward(loss)
            engine.step()
            acc["loss"] += loss.item()
            acc["l_ar"] += l_ar.item()
            acc["l_con"] += l_con.item()
            acc["l_kd"] += l_kd.item()
            acc["tokens"] += int(b["attention_mask"].sum()) * 2
            if not engine.is_gradient_accumulation_boundary():
                continue
            step += 1
            dt = time.perf_counter() - t_step
            t_step = time.perf_counter()
            ga = config["deepspeed"]["grad_accum"]
            metrics = {"step": step, "epoch": epoch, "loss": acc["loss"] / ga, "l_ar": acc["l_ar"] / ga,
                       "l_con": acc["l_con"] / ga, "l_kd": acc["l_kd"] / ga, "lr": sched.get_last_lr()[0], "step_s": round(dt, 3),
                       "tokens_per_s": round(acc["tokens"] * world / dt, 1), "skipped": acc["skipped"]}
            acc = {"loss": 0.0, "l_ar": 0.0, "l_con": 0.0, "l_kd": 0.0, "tokens": 0, "skipped": acc["skipped"]}
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                print(f"[train_aligner] step {step}/{total_steps} loss {metrics['loss']:.4f} "
                      f"(ar {metrics['l_ar']:.4f}, con {metrics['l_con']:.4f}, kd {metrics['l_kd']:.4f}) lr {metrics['lr']:.2e} "
                      f"{metrics['tokens_per_s']:.0f} tok/s", flush=True)
            done = step >= total_steps
            if step % config["train"]["checkpoint_every"] == 0 or done:
                _checkpoint(engine, metrics, {"step": step, "epoch": epoch, "micro_in_epoch": micro}, rank)
                last_ckpt = step
            else:
                ray.train.report(metrics)
            if done:
                break
    if step > last_ckpt:  # the data ran out before max steps: keep the final state too
        _checkpoint(engine, metrics, {"step": step, "epoch": config["train"]["epochs"], "micro_in_epoch": 0}, rank)
    if config["run"]["export"]:
        _export(engine, tok, run_dir / "aligner", config, rank)


def with_lora(model, lc: dict, gradient_checkpointing: bool):
    """The model with LoRA adapters (peft) on `target_modules`; only the adapters train. Export merges them
    back, so the aligner is written as a plain model of the starting architecture."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:  # checkpointed blocks need an input that requires grad to backprop into LoRA
        model.enable_input_require_grads()
    targets = lc["target_modules"]
    conf = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    return get_peft_model(model, conf)


def _checkpoint(engine, metrics: dict, state: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="state")  # every rank writes its own shard of the DeepSpeed state
        if rank == 0:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export(engine, tok, out: Path, config: dict, rank: int) -> None:
    if config["deepspeed"]["zero_stage"] == 3:  # parameters are partitioned: gather them on save
        engine.save_16bit_model(str(out), "pytorch_model.bin")
        if rank == 0:
            engine.module.config.save_pretrained(out)
            tok.save_pretrained(out)
        return
    if rank != 0:
        return
    if out.exists():
        shutil.rmtree(out)
    model = engine.module
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights they adapt
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"[train_aligner] final aligner written to {out}", flush=True)


# ---- driver -------------------------------------------------------------------------------------------
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
    cfg = load_config(TrainAlignerConfig, REPO / "conf/train_aligner.yaml", argv)
    validate(cfg)
    print("[train_aligner] resolved config:\n" + to_yaml(cfg), flush=True)

    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.ray.address, cfg.ray.num_cpus, log_to_driver=True,
             extra_env={"DS_ACCELERATOR": "cuda" if cfg.train.use_gpu else "cpu"})

    storage = Path(expand(cfg.run.storage_path)).resolve()
    run_dir = storage / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    columns = ["id", "messages", "states"] + (["trajectories"] if cfg.data.examples != "states" else [])
    ds = ray.data.read_parquet(expand(cfg.data.train_path))
    if "trajectories" in columns and "trajectories" not in ds.schema().names:
        raise ConfigError([f"data.examples={cfg.data.examples}: {cfg.data.train_path} has no trajectories "
                           "(write them with python -m jobs.build_states trajectory.enabled=true)"])
    ds = ds.select_columns(columns)
    if cfg.data.examples == "trajectories":
        ds = ds.filter(lambda r: len(good_trajectories(r["trajectories"])) > 0)
    else:
        ds = ds.filter(lambda r: len(as_states(r["states"])) >= 2)
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    ds = ds.materialize()
    n_rows = ds.count()
    if n_rows == 0:
        what = "a trajectory" if cfg.data.examples == "trajectories" else ">= 2 states"
        raise ConfigError([f"data.train_path: no rows with {what} in {cfg.data.train_path}"])
    per_step = cfg.deepspeed.micro_batch * cfg.deepspeed.grad_accum * cfg.train.num_workers
    steps_per_epoch = max(1, n_rows // per_step)
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    total = min(total, steps_per_epoch * cfg.train.epochs)
    print(f"[train_aligner] {n_rows} prompts, {per_step} examples per step, {total} optimizer steps", flush=True)

    loop_cfg = OmegaConf.to_container(cfg)
    loop_cfg.update(_total_steps=total, _run_dir=str(run_dir))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=cfg.train.keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": ds},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
    summary = {
        "prompts": n_rows, "optimizer_steps": total, "steps_logged": len(rows), "wall_s": round(wall, 1),
        "first": rows[0] if rows else None, "last": rows[-1] if rows else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "aligner": str(run_dir / "aligner") if cfg.run.export else None,
        "metrics": str(run_dir / "metrics.jsonl"), "loss_png": str(run_dir / "loss.png"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[train_aligner] summary:\n" + json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    run_job("train_aligner")
