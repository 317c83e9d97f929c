"""Ray Train + DeepSpeed (ZeRO-2, gloo, 2 CPU workers) on a tiny model: steps, logs, checkpoints, resume, export."""
import json

import pandas as pd
import pytest

from jobs.config import REPO, ConfigError


def _states(path, n=8, trajectories=True):
    rows = []
    for i in range(n):
        q = f"Question {i}: name a color."
        row = {"id": str(i), "messages": json.dumps([{"role": "user", "content": q}]),
               "states": json.dumps([f"bad answer {i}", f"better answer {i}!", f"The best answer is blue ({i})."])}
        if trajectories:  # token ids as build_states records them (any ids inside the tiny vocabulary)
            row["trajectories"] = json.dumps([{"from": 0, "states": ["x", "y", "z"], "state_ids": [[40, 41], [30, 31, 50],
                                               [30, 31, 32, 33]], "fixed_point": "z", "fixed_point_ids": [30, 31, 32, 33],
                                               "stop": "eos", "passes": 4, "converged": True}])
        rows.append(row)
    pd.DataFrame(rows).to_parquet(path)
    return path


def _args(tmp_path, tiny, **kw):
    base = {"data.train_path": str(tmp_path / "train.parquet"), "model.path": tiny, "run.storage_path": str(tmp_path / "runs"),
            "run.name": "t", "train.num_workers": 2, "train.cpus_per_worker": 0.4, "deepspeed.micro_batch": 2,
            "train.checkpoint_every": 2, "optim.lr": 1e-3, "optim.warmup_steps": 0, "loss.w_con": 1.0}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.timeout(600)
def test_train_checkpoint_resume_and_export(tmp_path, tiny_dirs, ray_local):
    from jobs.train_aligner import main

    tiny = str(tiny_dirs["llama"])
    _states(tmp_path / "train.parquet")
    kw = {"train.epochs": 3, "data.examples": "mixed", "loss.teacher": "initial", "loss.w_kd": 0.5}
    s = main(_args(tmp_path, tiny, **{"train.max_steps": 2, **kw}))
    run = tmp_path / "runs" / "t"
    log = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["l_ar"] > 0 and r["l_con"] > 0 and r["l_kd"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert (run / "loss.png").stat().st_size > 1000 and s["checkpoint"]

    # rerun with the same name and more steps: resumes at step 2, the loss goes on from there
    s2 = main(_args(tmp_path, tiny, **{"train.max_steps": 4, **kw}))
    log2 = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [r["step"] for r in log2] == [1, 2, 3, 4]
    assert log2[:2] == log  # earlier steps untouched
    assert s2["last"]["step"] == 4

    # the exported aligner loads by path and refines
    from pipeline.models import load_model
    from pipeline.decoding.refiner import Refiner, RefineRequest

    lm = load_model(str(run / "aligner"))
    out = Refiner(lm).refine([RefineRequest([{"role": "user", "content": "hi"}], "draft", "k", 8)])
    assert out[0].passes >= 1


@pytest.mark.timeout(600)
def test_lora_trains_only_adapters_and_exports_a_merged_model(tmp_path, tiny_dirs, ray_local):
    """lora.r > 0: only the adapters train; the export is a plain model of the starting architecture whose
    linear layers moved while the embeddings and norms stayed exactly as they were."""
    import torch

    from jobs.train_aligner import main
    from pipeline.models import load_model

    tiny = str(tiny_dirs["llama"])
    _states(tmp_path / "train.parquet")
    main(_args(tmp_path, tiny, **{"train.max_steps": 2, "lora.r": 4, "lora.alpha": 8, "optim.lr": 5e-2,
                                  "deepspeed.zero_stage": 2, "data.examples": "trajectories"}))
    before = load_model(tiny).model.state_dict()
    after_lm = load_model(str(tmp_path / "runs" / "t" / "aligner"))
    after = after_lm.model.state_dict()
    assert set(after) == set(before)  # merged: no adapter weights left, loadable as the base architecture
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved), sorted(moved)
    assert not any("embed" in k or "norm" in k for k in moved)
    from pipeline.decoding.refiner import Refiner, RefineRequest

    out = Refiner(after_lm).refine([RefineRequest([{"role": "user", "content": "hi"}], "draft", "k", 8)])
    assert out[0].passes >= 1


def test_config_errors_are_reported_together(tmp_path, tiny_dirs):
    from jobs.train_aligner import main

    with pytest.raises(ConfigError) as e:
        main([f"data.train_path={tmp_path / 'missing.parquet'}", "deepspeed.zero_stage=3", "deepspeed.precision=fp8",
              "loss.w_ar=0", "loss.w_con=0", "data.examples=trajectory", "loss.teacher=frozen"])
    msg = str(e.value)
    for part in ("not found", "zero_stage=3 needs GPUs", "fp8", "w_ar, w_con and w_kd", "'trajectory' is not one of",
                 "loss.teacher: 'frozen'"):
        assert part in msg
    with pytest.raises(ConfigError, match="not supported with deepspeed.zero_stage=3"):
        main([f"data.train_path={tmp_path / 'missing.parquet'}", "lora.r=8", "deepspeed.zero_stage=3",
              "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="set loss.teacher=initial"):
        main([f"data.train_path={tmp_path / 'missing.parquet'}", "loss.w_kd=1"])


def test_trajectory_examples_need_the_trajectories_column(tmp_path, tiny_dirs, ray_local):
    from jobs.train_aligner import main

    _states(tmp_path / "train.parquet", trajectories=False)
    with pytest.raises(ConfigError, match="trajectory.enabled=true"):
        main(_args(tmp_path, str(tiny_dirs["llama"]), **{"data.examples": "trajectories"}))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "conf").glob("train_aligner*.yaml")))
def test_shipped_deepspeed_configs_are_valid(name):
    """Every shipped recipe's DeepSpeed config passes DeepSpeed's own parser (no workers, no data needed)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from omegaconf import OmegaConf

    from jobs.config import load_config
    from jobs.train_aligner import TrainAlignerConfig, ds_config, validate

    cfg = load_config(TrainAlignerConfig, REPO / "conf/train_aligner.yaml", [f"config={REPO / 'conf' / name}"])
    try:
        validate(cfg)
    except ConfigError as e:  # the data file is written by build_states (or lives on cluster storage)
        assert all(p.startswith("data.train_path") for p in e.problems), e.problems
    ds = DeepSpeedConfig(ds_config(OmegaConf.to_container(cfg)))
    assert ds.zero_optimization_stage == cfg.deepspeed.zero_stage
    assert ds.train_micro_batch_size_per_gpu == cfg.deepspeed.micro_batch
    assert ds.gradient_accumulation_steps == cfg.deepspeed.grad_accum
    assert ds.bfloat16_config.enabled == (cfg.deepspeed.precision == "bf16")
    assert ds.zero_config.reduce_bucket_size == cfg.deepspeed.bucket_size
    assert ds.gradient_clipping == cfg.optim.grad_clip
