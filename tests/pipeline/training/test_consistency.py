"""The training objective on a tiny model: zero/positive consistency term, masks, and stop-gradient."""
import copy

import torch

from pipeline.training.consistency import Example, collate, common_prefix, losses, make_example, soft_cross_entropy
from tests.tiny import tiny_model, tiny_tokenizer

PAD = 0


def _model():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return tiny_model("llama", len(tok)), tok


def test_make_example_lays_the_state_over_the_target():
    _, tok = _model()
    stop = tok.eos_token_id
    msgs = [{"role": "user", "content": "Name a color."}]
    e = make_example(tok, msgs, "Blue is a color.", "Red", stop, PAD, max_answer_tokens=64)
    assert e.target_ids[-1] == stop and len(e.state_ids) == len(e.target_ids)
    assert e.state_ids[3:] == [PAD] * (len(e.target_ids) - 3)  # "Red" is 3 bytes; the rest is pad-filled
    long = make_example(tok, msgs, "x" * 10, "y" * 100, stop, PAD, max_answer_tokens=5)
    assert len(long.target_ids) == 5 and len(long.state_ids) == 5  # cut to the cap, stop token kept
    ic = make_example(tok, msgs, "Blue.", "Red", stop, PAD, max_answer_tokens=64, in_context=True)
    assert len(ic.prompt_ids) > len(e.prompt_ids)  # the draft is shown in the prompt
    assert "Red" in tok.decode(ic.prompt_ids)


def test_consistency_is_zero_at_the_target_and_positive_elsewhere():
    model, _ = _model()
    prompt, target = [5, 6, 7, 8], [20, 21, 22, 23, 2]
    same = collate([Example(prompt, target, list(target))], PAD)
    _, l_con, l_kd = losses(model, same)
    assert l_kd.item() == 0.0  # no reference model: no L_KD
    assert l_con.item() == 0.0 and not same["con_mask"].any()
    worse = collate([Example(prompt, target, [20, 21, 40, 41, 42])], PAD)
    l_ar, l_con, _ = losses(model, worse)
    assert l_con.item() > 0 and l_ar.item() > 0
    # only positions after the common prefix (2 tokens) are in the consistency mask
    assert common_prefix([20, 21, 40, 41, 42], target) == 2
    assert worse["con_mask"][0].nonzero().flatten().tolist() == [len(prompt) + 2, len(prompt) + 3]
    near = collate([Example(prompt, target, [20, 21, 40, 41, 42])], PAD, con_horizon=1)
    assert near["con_mask"][0].nonzero().flatten().tolist() == [len(prompt) + 2]  # only the next token's jump
    assert torch.equal(near["labels"], worse["labels"])


def test_prompt_and_padding_contribute_nothing():
    model, _ = _model()
    a = Example([5, 6, 7], [20, 21, 22, 2], [30, 31, 32, 33])
    b = Example([5, 6, 7, 8, 9, 10, 11], [24, 25, 26, 27, 28, 2], [24, 40, 41, 42, 43, 44])
    batch = collate([a, b], PAD)
    P = len(a.prompt_ids)
    assert (batch["labels"][0, :P - 1] == -100).all() and not batch["con_mask"][0, :P].any()
    assert (batch["labels"][0, P - 1:P + 3] == torch.tensor(a.target_ids)).all()
    pad_cols = batch["attention_mask"][0] == 0
    assert pad_cols.sum() == 6 and not batch["con_mask"][0, pad_cols].any()
    assert (batch["labels"][0, pad_cols] == -100).all()
    base = losses(model, batch)
    # whatever sits in the padding changes nothing
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["teacher_ids"][0, pad_cols] = 99
    noisy["student_ids"][0, pad_cols] = 77
    again = losses(model, noisy)
    assert torch.allclose(base[0], again[0]) and torch.allclose(base[1], again[1])
    # and labels at prompt positions would change L_AR if they were counted: they are not
    assert torch.equal(collate([a, b], PAD)["labels"], batch["labels"])


def test_gradient_flows_only_through_the_student_branch():
    model, _ = _model()
    batch = collate([Example([5, 6, 7, 8], [20, 21, 22, 23, 2], [20, 50, 51, 52, 53])], PAD)
    model.zero_grad()
    _, l_con, _ = losses(model, batch)
    l_con.backward()
    g_live = [p.grad.clone() for p in model.parameters()]
    # the same loss with the teacher logits from a frozen copy: identical gradients
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        t_logits = frozen(input_ids=batch["teacher_ids"], attention_mask=batch["attention_mask"]).logits
    model.zero_grad()
    s_logits = model(input_ids=batch["student_ids"], attention_mask=batch["attention_mask"]).logits
    soft_cross_entropy(s_logits, t_logits, batch["con_mask"]).backward()
    for a, b in zip(g_live, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_live)


def test_trajectory_example_trains_only_from_real_state_tokens():
    from pipeline.training.consistency import make_trajectory_example

    _, tok = _model()
    stop = tok.eos_token_id
    msgs = [{"role": "user", "content": "Name a color."}]
    fixed = [20, 21, 22, 23, 24, 25, 26, 27]
    e = make_trajectory_example(tok, msgs, fixed, True, [20, 21, 40, 41], stop, PAD, max_answer_tokens=64)
    assert e.target_ids == fixed + [stop] and e.state_len == 4 and e.state_ids[4:] == [PAD] * 5
    b = collate([e], PAD)
    P = len(e.prompt_ids)
    # common prefix 2: answer tokens 0..2 are predicted from identical contexts; 3 and 4 from the state's
    # real tokens (4 = the prediction after the block's last token); nothing from the padding after it
    assert b["con_mask"][0].nonzero().flatten().tolist() == [P + 2, P + 3]
    capped = make_trajectory_example(tok, msgs, fixed, False, fixed[:3] + [50] * 5, stop, PAD, max_answer_tokens=6)
    assert capped.target_ids == fixed[:6] and stop not in capped.target_ids, "no stop token where the answer was cut"
    ic = make_trajectory_example(tok, msgs, fixed, True, [20], stop, PAD, 64, in_context=True, draft="Red")
    assert "Red" in tok.decode(ic.prompt_ids)


def test_row_example_draws_states_or_trajectories_by_config():
    from pipeline.training.examples import row_example

    _, tok = _model()
    stop = tok.eos_token_id
    traj = {"from": 0, "states": ["a", "b"], "state_ids": [[30, 31], [20, 21, 22]], "fixed_point": "f",
            "fixed_point_ids": [20, 21, 22], "stop": "eos", "passes": 3, "converged": True}
    row = {"id": "7", "messages": [{"role": "user", "content": "Name a color."}],  # Arrow lists and structs
           "states": ["Red", "Blue is a color."], "trajectories": [traj, {"from": 0, "error": "too long"}]}
    cfg = {"kind": "trajectories", "max_answer_tokens": 64, "in_context": False, "seed": 0,
           "template": "{question} {draft}"}
    e = row_example(row, 0, tok, stop, PAD, **cfg)
    assert e.target_ids == [20, 21, 22, stop] and e.state_ids[:2] == [30, 31] and e.state_len == 2
    cfg["kind"] = "states"
    e = row_example(row, 0, tok, stop, PAD, **cfg)
    assert e.state_len is None and tok.decode(e.target_ids[:-1]) == "Blue is a color."
    cfg["kind"] = "mixed"
    kinds = {row_example({**row, "id": str(i)}, 0, tok, stop, PAD, **cfg).state_len is None for i in range(20)}
    assert kinds == {True, False}, "mixed draws both kinds"
    cfg["kind"] = "trajectories"
    e = row_example({**row, "trajectories": []}, 0, tok, stop, PAD, **cfg)
    assert e.state_len is None, "a row without a usable trajectory falls back to its ranked states"


def test_frozen_reference_gives_the_targets_and_l_kd():
    model, _ = _model()
    batch = collate([Example([5, 6, 7, 8], [20, 21, 22, 23, 2], [20, 50, 51, 52, 53])], PAD)
    reference = copy.deepcopy(model).requires_grad_(False)
    l_ar, l_con, l_kd = losses(model, batch, reference=reference)
    self_ar, self_con, _ = losses(model, batch)
    # the model still equals its reference: same targets as a self teacher, and L_KD is the teacher's entropy
    assert torch.allclose(l_con, self_con) and torch.allclose(l_ar, self_ar)
    with torch.no_grad():
        logits = model(input_ids=batch["teacher_ids"], attention_mask=batch["attention_mask"]).logits
    answer = batch["labels"] != -100
    p = torch.softmax(logits[answer], -1)
    assert torch.allclose(l_kd, -(p * p.log()).sum(-1).mean(), atol=1e-5)
    # once the model moves, the targets stay the reference's: the gradient of L_KD pulls it back
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    _, moved_con, moved_kd = losses(model, batch, reference=reference)
    _, own_con, _ = losses(model, batch)
    assert moved_kd.item() > l_kd.item() and not torch.allclose(moved_con, own_con)
    model.zero_grad()
    moved_kd.backward()
    assert all(prm.grad is None for prm in reference.parameters())
    assert any(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in model.parameters())
