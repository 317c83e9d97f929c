"""build_states: its scorers, stages and config, and the Ray Data job end to end (the ranking, filter and split
functions themselves: tests/pipeline/training/test_states.py)."""
import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.common.config import REPO, ConfigError, load_config
from pipeline.scoring.verdicts import parse_judge_score
from tests.conftest import shared_file

FAST = ["ray.progress_bars=false", "show_samples=0"]


def ans(text, score=None, gen="g", drop=None):
    return {"generator": gen, "text": text, "score": score, "raw_score": None, "drop": drop, "detail": ""}


# ---- scorers and trajectories -------------------------------------------------------------------------
@pytest.mark.parametrize("verdict,score", [
    ("Good answer.\nRating: [[7]]", 7.0), ("[[7.5]]", 7.5), ("[[ 8/10 ]]", 8.0), ("Rating: 6", 6.0),
    ("score = 9.", 9.0), ("I give it 8/10.", 8.0), ("7 out of 10", 7.0), ("8", 8.0), ("8.", 8.0),
    ("[[7]] ... so again [[7]]", 7.0), ("Rating: 7.5.", 7.5), ("[[10]]", 10.0), ("[[1]]", 1.0)])
def test_judge_verdicts_that_parse(verdict, score):
    assert parse_judge_score(verdict) == score


@pytest.mark.parametrize("verdict,why", [
    ("", "empty"), ("A fine answer, well done.", "no rating"), ("Rating: ten", "no rating"),
    ("[[3]] at first, but [[9]] in the end", "ambiguous"), ("3/10 for style, 8/10 overall", "ambiguous"),
    ("Rating: [[11]]", "outside"), ("[[0]]", "outside"), ("[[-3]]", "no rating"), ("9/100", "no rating"),
    (None, "empty")])
def test_judge_verdicts_that_are_errors_never_guesses(verdict, why):
    with pytest.raises(ValueError, match=why):
        parse_judge_score(verdict)


def test_judge_answer_asks_the_endpoint_and_parses():
    from pipeline.scoring.verdicts import judge_answer

    class FakeEndpoint:  # the one method of openai_http.ChatEndpoint the judge uses
        def __init__(self, reply):
            self.reply, self.seen = reply, []

        def chat(self, messages, max_tokens, temperature, top_p):
            self.seen.append((messages, temperature))
            return type("C", (), {"text": self.reply})()

    ep = FakeEndpoint("Clear and correct. Rating: [[9]]")
    assert judge_answer(ep, [{"role": "user", "content": "2+2?"}], "4") == 9.0
    (msgs, temp), = ep.seen
    assert "2+2?" in msgs[0]["content"] and "4" in msgs[0]["content"] and temp == 0.0
    with pytest.raises(ValueError, match="no rating"):
        judge_answer(FakeEndpoint("It is fine."), [{"role": "user", "content": "q"}], "a")


def test_reward_model_scores_each_answer_independently_of_the_batch(tiny_rm):
    from pipeline.scoring.reward_model import RewardModel

    rm = RewardModel(str(tiny_rm))
    msgs = [{"role": "user", "content": "Name a color."}]
    answers = ["Blue.", "A much longer answer about the color red, and why it is warm.", "Green"]
    batch = rm.score(msgs, answers)
    alone = [rm.score(msgs, [a])[0] for a in answers]
    assert len(batch) == 3 and all(isinstance(x, float) for x in batch)
    assert batch == pytest.approx(alone, abs=1e-5), "padding must not change a score"
    assert len({round(x, 6) for x in batch}) == 3
    assert "<|assistant|>Blue.<eos>" in rm.render(msgs, "Blue."), "the chat template renders the pair"
    with pytest.raises(ValueError, match="label_index"):
        RewardModel(str(tiny_rm), label_index=1)


def test_draft_stage_adds_seeded_answers(tiny_dirs):
    import pyarrow as pa

    from jobs.build_states import BaseCfg, DraftStage
    from pipeline.decoding.drafting import SamplingParams
    from pipeline.training.states import ROW_SCHEMA, error_row

    base = BaseCfg(model=str(tiny_dirs["llama"]), name="tiny", sampling=SamplingParams(max_new_tokens=8), num_answers=2)
    stage = DraftStage(base, seed=0, threads=1)
    rows = pa.Table.from_pylist([{"id": "1", "messages": [{"role": "user", "content": "Hi?"}], "reference": None,
                                  "answers": [ans("given", None, "file")], "meta": {}, "error": None,
                                  "error_kind": None}, error_row("2", "input", "bad")], schema=ROW_SCHEMA)
    out1, out2 = stage(rows), stage(rows)
    a1 = out1.column("answers")[0].as_py()
    assert [a["generator"] for a in a1] == ["file", "tiny#0", "tiny#1"]
    assert a1 == out2.column("answers")[0].as_py(), "seeded by (seed, base, row id): reruns draw the same samples"
    assert out1.column("answers")[1].as_py() == [], "error rows are left alone"


# ---- the job ------------------------------------------------------------------------------------------
def _good(i, k):
    return {"generator": f"m{k}", "output": f"Answer {k} to question {i}, with its own words.",
            "win_prob_vs_reference": str(0.1 * k)}


def _records():
    recs = [
        {"id": 1, "instruction": "Q1", "reference_output": "R1",
         "responses": [_good(1, 1), _good(1, 5), _good(1, 3), dict(_good(1, 4), win_prob_vs_reference="0.5")]},
        {"id": 2, "instruction": "Q2", "reference_output": "R2", "responses": [
            {"generator": "e1", "output": "", "win_prob_vs_reference": "0.9"},
            {"generator": "e2", "output": "  \n", "win_prob_vs_reference": "0.9"},
            {"generator": "rep", "output": "go " * 40, "win_prob_vs_reference": "0.9"},
            {"generator": "long", "output": " ".join(f"word{n}" for n in range(150)), "win_prob_vs_reference": "0.9"},
            _good(2, 1), _good(2, 2)]},
        {"id": 3, "instruction": "Q3", "reference_output": "R3", "responses": [
            dict(_good(3, 1), win_prob_vs_reference="n/a"), _good(3, 2), _good(3, 3),
            dict(_good(3, 3), generator="copy", win_prob_vs_reference="0.1")]},
        {"id": 4, "instruction": "Q4", "reference_output": "R4", "responses": [_good(4, k) for k in range(3)]},
        {"id": 5, "instruction": "Q5", "reference_output": "R5", "responses": [
            _good(5, 1), {"generator": "e", "output": "", "win_prob_vs_reference": "0.2"}]},
        {"id": 6, "prompt": "wrong field", "responses": [_good(6, 1), _good(6, 2)]},
    ]
    recs += [{"id": i, "instruction": f"Q{i}", "reference_output": f"R{i}", "responses": [_good(i, 1), _good(i, 2)]}
             for i in range(7, 25)]
    return recs


def _write_gz(path: Path, recs, bad_line=True) -> Path:
    lines = [json.dumps(r).encode() for r in recs] + ([b'{"id": 99, "instruction": '] if bad_line else [])
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
    return path


def _run(args):
    from jobs.build_states import main

    return main(args + FAST)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_dirs, ray_local):
    """The job on `_records()` (nested layout, score column), run once: (its arguments, summary, output folder)."""
    tmp = tmp_path_factory.mktemp("build_states")
    src = _write_gz(tmp / "in.jsonl.gz", _records())
    args = [f"input.path={src}", f"filters.tokenizer={tiny_dirs['llama']}", "filters.max_tokens=600",
            "split.dev_fraction=0.3", "seed=1"]
    return args, _run(args + [f"output.path={tmp / 'a'}"]), tmp / "a"


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_job_filters_ranks_splits_and_is_deterministic(tmp_path, first_run):
    args, s, out = first_run
    assert s["rows_in"] == 25 and s["rows_out"] == 22 and s["error_rows"] == 3
    assert s["error_rows_by_kind"] == {"input": 2, "too_few_states": 1}
    assert s["answers_dropped"] == {"empty": 3, "repetition": 1, "too_long": 1, "no_score": 1, "score_error": 0,
                                    "draft_error": 0, "duplicate": 1}
    errors = {e["id"]: e for e in map(json.loads, open(out / "errors.jsonl"))}
    assert "missing prompt field 'instruction'" in errors["6"]["error"]
    assert "not valid JSON" in errors["in.jsonl.gz:25"]["error"]
    assert errors["5"]["error_kind"] == "too_few_states" and "1 empty" in errors["5"]["error"]
    parts = {sp: pd.read_parquet(out / f"{sp}.parquet") for sp in ("train", "dev", "heldout")}
    assert sum(map(len, parts.values())) == 22 and len(parts["dev"]) > 0
    assert not any(int(i) % 4 == 0 for sp in ("train", "dev") for i in parts[sp]["id"]), "no held-out id in training"
    assert all(int(i) % 4 == 0 for i in parts["heldout"]["id"])
    rows = pd.concat(parts.values()).set_index("id")
    r1 = rows.loc["1"]
    assert list(r1["scores"]) == sorted(r1["scores"]) and r1["scores"][-1] == pytest.approx(0.5)
    assert r1["target"] == r1["states"][-1] and r1["num_states"] == 4
    r2 = rows.loc["2"]
    assert list(r2["generators"]) == ["m1", "m2"], "empty, repetitive and over-length answers are dropped"
    assert {d["reason"] for d in r2["dropped"]} == {"empty", "repetition", "too_long"}
    assert list(rows.loc["3"]["generators"]) == ["m2", "m3"], "the lower-scored duplicate and the unscored go"
    assert list(rows.loc["1"]["messages"]) == [{"role": "user", "content": "Q1"}]

    s2 = _run(args + [f"output.path={tmp_path / 'b'}"])
    for f in ("train.parquet", "dev.parquet", "heldout.parquet", "errors.jsonl"):
        assert (out / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f"{f} differs between two runs"
    assert s2["rows_by_split"] == s["rows_by_split"]


@pytest.mark.integration
def test_train_parquet_columns_are_arrow_lists_and_structs_not_json_text(first_run):
    import pyarrow as pa

    from pipeline.records import MESSAGE
    from pipeline.training.states import STATES_SCHEMA
    from pipeline.training.trajectories import TRAJECTORY

    out = first_run[2]
    for sp in ("train", "dev", "heldout"):
        assert pq.read_schema(out / f"{sp}.parquet").equals(STATES_SCHEMA), f"{sp}.parquet is not STATES_SCHEMA"
    types = {f.name: f.type for f in pq.read_schema(out / "train.parquet")}
    assert types["messages"] == pa.list_(MESSAGE) and types["trajectories"] == pa.list_(TRAJECTORY)
    assert types["states"] == pa.list_(pa.string()) and types["scores"] == pa.list_(pa.float64())
    assert pa.types.is_struct(types["dropped"].value_type) and pa.types.is_map(types["meta"])
    assert not any(pa.types.is_string(types[k]) for k in ("messages", "dropped", "meta", "trajectories"))
    row = pq.read_table(out / "train.parquet").to_pylist(maps_as_pydicts="strict")[0]
    assert row["messages"] == [{"role": "user", "content": f"Q{row['id']}"}] and row["trajectories"] == []


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_job_adds_trajectories_to_train_rows_only(tmp_path, tiny_dirs, ray_local):
    src = _write_gz(tmp_path / "in.jsonl.gz", _records(), bad_line=False)
    tiny = str(tiny_dirs["llama"])
    s = _run([f"input.path={src}", f"filters.tokenizer={tiny}", "filters.max_tokens=600", "split.dev_fraction=0.3",
              f"output.path={tmp_path / 'o'}", "trajectory.enabled=true", f"trajectory.model={tiny}",
              "trajectory.from_states=1", "trajectory.refine.block_size=4", "trajectory.refine.max_iter=5",
              "trajectory.refine.max_new_tokens=8", "trajectory.max_states=3", "trajectory.num_cpus=0.5"])
    parts = {sp: pq.read_table(tmp_path / "o" / f"{sp}.parquet").to_pylist() for sp in ("train", "dev", "heldout")}
    for sp in ("dev", "heldout"):
        assert all(r["trajectories"] == [] for r in parts[sp]), f"no trajectories for {sp} rows"
    train = parts["train"]
    assert len(train) > 0 and s["trajectories"]["count"] == len(train) and s["trajectories"]["errors"] == 0
    for r in train:
        (tr,) = r["trajectories"]  # from_states=1: one per prompt
        assert 0 <= tr["from"] < r["num_states"] - 1, "starts from a worse answer, never the target"
        assert tr["state_ids"][-1] == tr["fixed_point_ids"] and len(tr["state_ids"]) <= 3
        assert tr["converged"] and len(tr["fixed_point_ids"]) <= 8


def test_parquet_rows_are_normalized_like_json_rows(tmp_path):
    """What Ray's read_parquet hands the parser: Arrow batches, lists of structs for the answers, nulls for gaps."""
    from jobs.build_states import BuildStatesConfig, input_error
    from jobs.common import blocks
    from pipeline.training.states import ROW_SCHEMA, normalize_record

    recs = _records()[:2] + [{"id": 30, "instruction": "Q30", "reference_output": None, "responses": []}]
    pd.DataFrame(recs).to_parquet(tmp_path / "x.parquet")
    fields = load_config(BuildStatesConfig, "conf/build_states.yaml", []).input.fields()
    parser = blocks.Parser(lambda rec, fid, _: normalize_record(rec, fid, fields=fields), input_error, ROW_SCHEMA, 100)
    task = blocks.FileTask(str(tmp_path / "x.parquet"), "x", "x.parquet")
    rows = parser.rows([th for th, _, _ in blocks._records(task)]).to_pylist(maps_as_pydicts="strict")
    expect = [normalize_record(r, "-", fields) for r in recs]
    for r, e in zip(rows, expect):
        assert r["answers"] == e["answers"] and r["messages"] == e["messages"]
        assert r["error"] is None and r["reference"] == e["reference"]
    assert rows[1]["error_kind"] is None and len(rows[1]["answers"]) == 6


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_job_reward_model_flat_layout_reference_target(tmp_path, tiny_rm, ray_local, capsys):
    """Flat layout: a prompt's records come together wherever they are (hash partitions of the id are the blocks);
    a partition file deleted is redone alone, and the outputs come out the same."""
    from pipeline.scoring.reward_model import RewardModel

    flat = [{"qid": f"q{i}", "question": f"Question {i}?", "answer": f"Answer {k} to {i}.", "model": f"m{k}",
             "ref": f"Reference {i}."} for i in range(5) for k in range(3)]
    flat.append({"qid": "q9", "question": "Lonely?", "answer": "", "model": "m0", "ref": "Ref."})
    src = tmp_path / "flat.jsonl"  # (Ray's read_parquet costs ~15 s cold here; the Parquet parser is tested above)
    src.write_text("".join(json.dumps(r) + "\n" for r in flat[::-1]))  # reversed: the merge must not care
    s = _run(args := [f"input.path={src}", f"output.path={tmp_path / 'o'}", "input.layout=flat", "input.id_field=qid",
              "input.prompt_field=question", "input.text_field=answer", "input.generator_field=model",
              "input.score_field=null", "input.reference_field=ref", "score.kind=reward_model",
              f"score.reward_model.model={tiny_rm}", "rank.target=reference", "filters.max_tokens=null",
              "split.heldout_mod=null", "ray.rows_per_block=4"])
    assert s["rows_in"] == 6 and s["rows_out"] == 5 and s["answers_dropped"]["empty"] == 1
    files = sorted((tmp_path / "o" / "rows").glob("part-*.parquet"))
    assert 1 < len(files) == s["blocks"] <= 4, "16 records, 4 per block: up to 4 hash partitions of the 6 ids"
    assert s["error_rows_by_kind"] == {"too_few_states": 1}, "q9: only the reference is left"
    df = pd.read_parquet(tmp_path / "o" / "train.parquet").set_index("id")
    rm = RewardModel(str(tiny_rm))
    for qid, r in df.iterrows():
        assert r["num_states"] == 4 and r["states"][-1] == r["target"] and r["generators"][-1] == "reference"
        assert pd.isna(r["scores"][-1]) and list(r["scores"][:-1]) == sorted(r["scores"][:-1])
        direct = dict(zip(r["states"][:-1], rm.score([{"role": "user", "content": r["prompt"]}],
                                                     list(r["states"][:-1]))))
        assert list(r["scores"][:-1]) == pytest.approx([direct[t] for t in r["states"][:-1]], abs=1e-4)

    first = (tmp_path / "o" / "train.parquet").read_bytes()
    files[0].unlink()
    capsys.readouterr()
    s2 = _run(args)
    assert f"{len(files) - 1} partition(s) already written" in capsys.readouterr().out
    assert (tmp_path / "o" / "train.parquet").read_bytes() == first and s2["rows_in"] == 6 and s2["blocks"] == len(files)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_job_on_real_alpaca_eval_ranked_responses(tmp_path, tiny_dirs, ray_local):
    path = shared_file("alpaca_eval/ranked_responses.jsonl.gz")
    s = _run([f"input.path={path}", f"output.path={tmp_path}", "input.limit=16",
              f"filters.tokenizer={tiny_dirs['llama']}", "filters.max_tokens=8192"])
    assert s["rows_in"] == 16 and s["rows_out"] + s["error_rows"] == 16 and s["answers_in"] == 16 * 8
    src = {}
    with gzip.open(path, "rt") as f:
        for line, _ in zip(f, range(16)):
            r = json.loads(line)
            src[str(r["id"])] = r
    held = pd.read_parquet(tmp_path / "heldout.parquet")
    train = pd.read_parquet(tmp_path / "train.parquet")
    assert set(held["id"]) <= {"0", "4", "8", "12"} and not any(int(i) % 4 == 0 for i in train["id"])
    for _, r in pd.concat([train, held]).iterrows():
        given = {a["generator"]: float(a["win_prob_vs_reference"]) for a in src[r["id"]]["responses"]}
        assert list(r["scores"]) == sorted(r["scores"]) == [given[g] for g in r["generators"]]
        assert r["target"] == r["states"][-1] and r["prompt"] == src[r["id"]]["instruction"]
        kept_best = max(given[g] for g in r["generators"])
        assert r["scores"][-1] == kept_best


@pytest.mark.integration
def test_config_errors_are_reported_together(tmp_path, ray_local):
    from jobs.build_states import BuildStatesConfig
    from jobs.common.data import preflight

    with pytest.raises(ConfigError, match="nope"):
        load_config(BuildStatesConfig, "conf/build_states.yaml", ["rank.nope=1"])
    # values of the wrong type or out of range are reported together, then (once the types are right) every
    # rule that spans keys or looks at files
    for args, keys in ((["rank.target=worst", "filters.max_repeat_fraction=1.5"],
                        ("rank.target", "filters.max_repeat_fraction")),
                       (["input.path=/does/not/exist.jsonl", "score.kind=reward_model", "split.heldout_rem=4",
                         "bases=[{model: /no/such/model}]"],
                        ("input.path", "score.reward_model.model", "split", "bases.0.model"))):
        with pytest.raises(ConfigError) as e:
            load_config(BuildStatesConfig, "conf/build_states.yaml", args)
        msg = str(e.value)
        for key in keys:
            assert key in msg, f"{key} missing from {msg}"
    cfg = load_config(BuildStatesConfig, "conf/build_states.yaml",
                      ["score.kind=judge", "score.judge.base_url=http://x/v1", "score.judge.model=j",
                       "score.judge.num_cpus=1", "score.judge.concurrency=2"])
    with pytest.raises(ConfigError, match="fractions"):
        preflight(cfg.pools())


def test_conf_file_loads_and_validates(tmp_path):
    from jobs.build_states import BuildStatesConfig

    src = _write_gz(tmp_path / "x.jsonl.gz", _records()[:1], bad_line=False)
    cfg = load_config(BuildStatesConfig, REPO / "conf/build_states.yaml", [f"input.path={src}"])  # checks it too
    assert cfg.score.kind == "column" and cfg.rank.target == "best" and cfg.split.heldout_mod == 4


def test_trajectory_stage_refuses_an_aligner_the_fast_engine_cannot_run_before_starting(tmp_path, tiny_dirs):
    from jobs.build_states import BuildStatesConfig
    from pipeline.models import load_model
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from tests.tiny import save_tiny

    qwen = save_tiny("qwen2", tmp_path / "qwen2-windowed", use_sliding_window=True, sliding_window=8,
                     max_window_layers=0)  # a windowed family the fast engine does not run exactly
    src = _write_gz(tmp_path / "x.jsonl.gz", _records()[:1], bad_line=False)
    args = [f"input.path={src}", "trajectory.enabled=true"]
    with pytest.raises(ConfigError, match="trajectory.model: .*sliding window.*fast engine"):
        load_config(BuildStatesConfig, REPO / "conf/build_states.yaml", args + [f"trajectory.model={qwen}"])
    for ok in (tiny_dirs["llama"], save_tiny("gemma2", tmp_path / "gemma2")):  # full attention; Gemma-2's windows
        load_config(BuildStatesConfig, REPO / "conf/build_states.yaml", args + [f"trajectory.model={ok}"])
    ref = Refiner(load_model(str(tiny_dirs["llama"])), mode="reference")
    item = ref.encode(RefineRequest([{"role": "user", "content": "hi"}], "abc"))
    with pytest.raises(ValueError, match="needs mode='fast'"):
        ref.refine_items([item], trace=[[]])
