"""Ray Train + DeepSpeed (ZeRO-2, gloo, 2 CPU workers) on a tiny model: steps, logs, checkpoints, resume, export."""
import json

import pytest

from jobs.common.config import REPO, ConfigError, load_config, resolve_path


def _states(path, n=8, trajectories=True):
    """A train.parquet as build_states writes it: Arrow lists and structs, the target state last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.records import MESSAGE
    from pipeline.training.trajectories import TRAJECTORY

    rows = []
    for i in range(n):
        q = f"Question {i}: name a color."
        row = {"id": str(i), "messages": [{"role": "user", "content": q}],
               "states": [f"bad answer {i}", f"better answer {i}!", f"The best answer is blue ({i})."]}
        if trajectories:  # token ids as build_states records them (any ids inside the tiny vocabulary)
            row["trajectories"] = [{"from": 0, "states": ["x", "y", "z"], "state_ids": [[40, 41], [30, 31, 50],
                                    [30, 31, 32, 33]], "fixed_point": "z", "fixed_point_ids": [30, 31, 32, 33],
                                    "stop": "eos", "passes": 4, "converged": True}]
        rows.append(row)
    fields = [("id", pa.string()), ("messages", pa.list_(MESSAGE)), ("states", pa.list_(pa.string()))]
    fields += [("trajectories", pa.list_(TRAJECTORY))] if trajectories else []
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def _args(tmp_path, tiny, **kw):
    base = {"data.train_path": str(tmp_path / "train.parquet"), "model.path": tiny, "run.storage_path": str(tmp_path / "runs"),
            "run.name": "t", "train.num_workers": 2, "train.cpus_per_worker": 0.4, "deepspeed.micro_batch": 2,
            "train.checkpoint_every": 2, "optim.lr": 1e-3, "optim.warmup_steps": 0, "loss.w_con": 1.0}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.integration
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


@pytest.mark.integration
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
    """Values the schema refuses are listed together; once they are right, so are the rules across keys."""
    from jobs.train_aligner import main

    missing = f"data.train_path={tmp_path / 'missing.parquet'}"
    with pytest.raises(ConfigError) as e:
        main([missing, "deepspeed.zero_stage=3", "deepspeed.precision=fp8", "loss.w_ar=0", "loss.w_con=0",
              "data.examples=trajectory", "loss.teacher=frozen"])
    msg = str(e.value)
    for part in ("deepspeed.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')",
                 "data.examples: Input should be 'states', 'trajectories' or 'mixed' (got 'trajectory')",
                 "loss.teacher: Input should be 'self' or 'initial' (got 'frozen')"):
        assert part in msg
    with pytest.raises(ConfigError) as e:
        main([missing, "deepspeed.zero_stage=3", "loss.w_ar=0", "loss.w_con=0"])
    msg = str(e.value)
    for part in ("not found", "zero_stage=3 needs GPUs", "w_ar, w_con and w_kd"):
        assert part in msg
    with pytest.raises(ConfigError, match="not supported with deepspeed.zero_stage=3"):
        main([missing, "lora.r=8", "deepspeed.zero_stage=3", "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="set loss.teacher=initial"):
        main([missing, "loss.w_kd=1"])


def test_a_bad_config_lists_every_problem_in_one_error(tmp_path):
    """One ConfigError names every wrong key: unknown keys and values out of range, or (once those are right)
    every file that is missing and every rule across sections that is broken."""
    from jobs.train_aligner import TrainAlignerConfig

    conf = REPO / "conf/train_aligner.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(TrainAlignerConfig, conf, ["optim.learning_rate=1e-4", "optim.lr=0", "train.num_workers=0",
                                               "data.max_answer_tokens=1", "lora.dropout=1.5", "run.name=a/b",
                                               "deepspeed.zero_stage=4"])
    keys = [p.split(":")[0] for p in e.value.problems]
    assert {"optim.learning_rate", "optim.lr", "train.num_workers", "data.max_answer_tokens", "lora.dropout",
            "run.name", "deepspeed.zero_stage"} <= set(keys), e.value.problems
    assert "optim.learning_rate: unknown key" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(TrainAlignerConfig, conf, [f"data.train_path={tmp_path / 'none.parquet'}",
                                               f"model.path={tmp_path / 'no-model'}", "model.template=no fields",
                                               "deepspeed.precision=fp16", "lora.r=4", "deepspeed.zero_stage=3"])
    starts = ("lora: adapters are not supported", "deepspeed.zero_stage=3 needs GPUs",
              "deepspeed.precision=fp16 needs GPUs", "data.train_path:", "model.path: not found", "model.template:")
    assert len(e.value.problems) == len(starts), e.value.problems
    assert all(any(p.startswith(s) for p in e.value.problems) for s in starts), e.value.problems


@pytest.mark.integration
def test_trajectory_examples_need_the_trajectories_column(tmp_path, tiny_dirs, ray_local):
    from jobs.train_aligner import main

    _states(tmp_path / "train.parquet", trajectories=False)
    with pytest.raises(ConfigError, match="trajectory.enabled=true"):
        main(_args(tmp_path, str(tiny_dirs["llama"]), **{"data.examples": "trajectories"}))


def load_shipped(name: str, tmp_path):
    """conf/<name> through load_config. The files it names that only exist where the recipe runs (the
    build_states output, cluster storage) are replaced by stand-ins in tmp_path."""
    from omegaconf import OmegaConf

    from jobs.train_aligner import TrainAlignerConfig

    raw = OmegaConf.load(REPO / "conf" / name)
    overrides = [f"config={REPO / 'conf' / name}"]
    train = OmegaConf.select(raw, "data.train_path", default=TrainAlignerConfig().data.train_path)
    if not resolve_path(train).exists():
        _states(tmp_path / "train.parquet")
        overrides.append(f"data.train_path={tmp_path / 'train.parquet'}")
    model = OmegaConf.select(raw, "model.path", default="default")
    if model.startswith("/") and not resolve_path(model).exists():
        (tmp_path / "model").mkdir()
        overrides.append(f"model.path={tmp_path / 'model'}")
    return load_config(TrainAlignerConfig, REPO / "conf/train_aligner.yaml", overrides)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "conf").glob("train_aligner*.yaml")))
def test_shipped_configs_load_and_their_deepspeed_configs_are_valid(name, tmp_path):
    """Every shipped recipe validates through load_config, and its DeepSpeed config passes DeepSpeed's own
    parser (no workers, no data needed)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_shipped(name, tmp_path)
    ds = DeepSpeedConfig(cfg.deepspeed.engine_config(cfg.optim.grad_clip))
    assert ds.zero_optimization_stage == cfg.deepspeed.zero_stage
    assert ds.train_micro_batch_size_per_gpu == cfg.deepspeed.micro_batch
    assert ds.gradient_accumulation_steps == cfg.deepspeed.grad_accum
    assert ds.bfloat16_config.enabled == (cfg.deepspeed.precision == "bf16")
    assert ds.zero_config.reduce_bucket_size == cfg.deepspeed.bucket_size
    assert ds.gradient_clipping == cfg.optim.grad_clip
