"""The reward model refuses what it would have to truncate, and says why."""
import pytest


def test_an_answer_past_the_limit_is_refused_with_its_length(tiny_rm):
    from pipeline.evaluation.judges import RewardJudge
    from pipeline.scoring.reward_model import RewardModel

    rm = RewardModel(str(tiny_rm), max_length=64)
    msgs = [{"role": "user", "content": "Name a color."}]
    fits, why = rm.too_long(msgs, ["Blue.", "word " * 40])
    assert fits is None and "reward model" in why and "limit of 64 tokens" in why
    with pytest.raises(ValueError, match="exceeds its limit of 64 tokens"):
        rm.score(msgs, ["Blue.", "word " * 40])
    assert len(rm.score(msgs, ["Blue."])) == 1, "what fits is scored"
    assert RewardModel(str(tiny_rm), max_length=100_000).limit == 4096, "the model's own window caps the limit"
    score, pref = RewardJudge(str(tiny_rm), max_length=64).score(msgs, "word " * 40, "Blue.")
    assert score.status == "error" and "limit of 64 tokens" in score.raw and pref.status == "error"
