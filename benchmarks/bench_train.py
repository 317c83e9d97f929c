"""One consistency-training step: Ray Train + DeepSpeed ZeRO-2 with 2 workers vs plain single-process PyTorch on
the same global batch (goal: <= 1.2x step time), and peak memory per worker with ZeRO-0 vs ZeRO-2; then the
same ZeRO-2 step with LoRA adapters (`lora.r` of the job) instead of full fine-tuning.

    .venv/bin/python benchmarks/bench_train.py [model=default] [batch=4] [answer_tokens=96] [steps=4] \
        [bucket_size=50000000] [lora_r=16]   (lora_r=0 skips the LoRA run)

Same model, same examples (real AlpacaEval ranked answers when ../shared/data is there, else synthetic),
same loss (w_ar = w_con = 1), AdamW. Plain: one process, 2 torch threads, the whole batch per step.
Ray Train: 2 workers x 1 thread, each half of the batch, gloo all-reduce / ZeRO partitioning by DeepSpeed.
Step time = median over `steps` steps after one warm-up step, measured inside the training loop.
Peak memory = the worker process's peak RSS (ru_maxrss), model load included; also shown: the part of it
added by training (peak - RSS after loading the model) and the optimizer state each rank holds (ZeRO-1/2
partition it). `bucket_size` is DeepSpeed's reduce / all-gather bucket in elements (the job's
`deepspeed.bucket_size`); DeepSpeed's own default (5e8) adds a staging buffer as large as the gradients.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANKED = ROOT.parent / "shared/data/alpaca_eval/ranked_responses.jsonl.gz"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    model: str = Field("default", description="the model trained (as the job's model key)")
    batch: int = Field(4, description="global batch: examples per step (each Ray Train worker takes half)")
    answer_tokens: int = Field(96, description="answer tokens per example")
    steps: int = Field(4, description="measured steps per run (after one warm-up step)")
    bucket_size: int = Field(50_000_000, description="DeepSpeed's reduce / all-gather bucket in elements "
                                                     "(the job's deepspeed.bucket_size; 5e7 works too)")
    lora_r: int = Field(16, description="rank of the LoRA run (the job's lora.r); 0 skips the LoRA run")


def examples_raw(n: int) -> list[tuple[list, str, str]]:
    if RANKED.exists():
        out = []
        for line in gzip.open(RANKED, "rt"):
            r = json.loads(line)
            if r["id"] % 4 == 0:
                continue
            answers = sorted(r["responses"], key=lambda a: float(a["win_prob_vs_reference"]))
            out.append(([{"role": "user", "content": r["instruction"]}], answers[-1]["output"], answers[0]["output"]))
            if len(out) == n:
                return out
    return [([{"role": "user", "content": f"Explain idea {i} in detail."}], "A careful answer. " * 40,
             "A sloppy one. " * 30) for i in range(n)]


def build_batch(tok, stop_id, pad_id, raw, answer_tokens):
    from pipeline.training.consistency import collate, make_example

    return collate([make_example(tok, m, t, s, stop_id, pad_id, answer_tokens) for m, t, s in raw], pad_id)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def optimizer_state_mb(opt) -> float:
    """Bytes of optimizer state this rank holds (walks DeepSpeed's wrappers down to the torch optimizer)."""
    import torch

    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t)) / 2 ** 20


def loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    from pipeline.models import load_model
    from pipeline.training.consistency import losses
    from pipeline.training.deepspeed_config import deepspeed_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    lm = load_model(config["model"], dtype="float32")
    lm.model.train()
    loaded_mb = rss_mb()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_ids[0]
    raw = config["raw"]
    per = len(raw) // world
    batch = build_batch(lm.tokenizer, lm.stop_ids[0], pad, raw[rank * per:(rank + 1) * per], config["answer_tokens"])
    model = lm.model
    if config["lora"]:
        from pipeline.training.lora import with_lora

        model = with_lora(model, r=config["lora"], alpha=2.0 * config["lora"], dropout=0.0,
                          target_modules="all-linear", gradient_checkpointing=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ds = deepspeed_config(zero_stage=config["zero"], precision="fp32", micro_batch=per, grad_accum=1, grad_clip=1.0,
                          bucket_size=config["bucket_size"], offload_optimizer=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    times = []
    for _ in range(config["steps"] + 1):
        t0 = time.perf_counter()
        l_ar, l_con, _ = losses(engine, batch)
        engine.backward(l_ar + l_con)
        engine.step()
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"step_s": statistics.median(times[1:]), "peak_mb": peak_mb, "train_mb": peak_mb - loaded_mb,
           "optim_mb": optimizer_state_mb(engine.optimizer)}
    ray.train.report({**row, "rank": rank})
    with open(config["out"] + f".{config['run']}.{rank}", "w") as f:
        json.dump(row, f)


def main():
    options = load_config(Options, None, sys.argv[1:])
    model, bsz = options.model, options.batch
    answer_tokens, steps = options.answer_tokens, options.steps
    bucket = options.bucket_size
    lora_r = options.lora_r
    raw = examples_raw(bsz)

    import tempfile

    import torch

    from pipeline.training.consistency import losses
    from pipeline.models import load_model

    # ---- plain PyTorch, one process, 2 threads ----------------------------------------------------------
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm = load_model(model, dtype="float32")
    lm.model.train()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_ids[0]
    batch = build_batch(lm.tokenizer, lm.stop_ids[0], pad, raw, answer_tokens)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-5)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        l_ar, l_con, _ = losses(lm.model, batch)
        (l_ar + l_con).backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    plain = statistics.median(times[1:])
    print(f"plain PyTorch step: {plain:.2f}s (batch {bsz} x {batch['teacher_ids'].shape[1]} tokens, 2 threads)",
          flush=True)
    del lm, opt

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}})
    tmp = tempfile.mkdtemp()
    res = {}
    runs = {"zero2": (2, 0), "zero0": (0, 0), **({"zero2_lora": (2, lora_r)} if lora_r else {})}
    for run, (zero, r) in runs.items():
        trainer = TorchTrainer(loop, train_loop_config={"model": model, "raw": raw, "answer_tokens": answer_tokens,
                                                        "steps": steps, "zero": zero, "lora": r, "run": run,
                                                        "out": tmp + "/r", "bucket_size": bucket},
                               scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                               run_config=ray.train.RunConfig(storage_path=tmp, name=run),
                               torch_config=TorchConfig(backend="gloo"))
        trainer.fit()
        rows = [json.load(open(f"{tmp}/r.{run}.{k}")) for k in range(2)]
        res[run] = x = {k: max(row[k] for row in rows) for k in rows[0]}
        what = f"ZeRO-{zero}" + (f" + LoRA r={r}" if r else "")
        print(f"Ray Train + DeepSpeed {what}, 2 workers: step {x['step_s']:.2f}s, peak RSS per worker "
              f"{x['peak_mb']:.0f} MB (training adds {x['train_mb']:.0f} MB; optimizer state {x['optim_mb']:.1f} MB "
              f"per rank)", flush=True)
    ray.shutdown()
    z2, z0 = res["zero2"], res["zero0"]
    print(f"figure: train_step_zero2_2workers_vs_plain = {z2['step_s'] / plain:.2f}")
    print(f"figure: peak_mem_per_worker_zero2_vs_zero0 = {z2['peak_mb'] / z0['peak_mb']:.2f}")
    print(f"figure: training_mem_per_worker_zero2_vs_zero0 = {z2['train_mb'] / z0['train_mb']:.2f}")
    print(f"figure: optimizer_state_per_rank_zero2_vs_zero0 = {z2['optim_mb'] / z0['optim_mb']:.2f}")
    if "zero2_lora" in res:
        lo = res["zero2_lora"]
        print(f"figure: train_step_lora_vs_full_zero2 = {lo['step_s'] / z2['step_s']:.2f}")
        print(f"figure: training_mem_per_worker_lora_vs_full_zero2 = {lo['train_mb'] / z2['train_mb']:.2f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_train] {e}", file=sys.stderr)
        sys.exit(2)
