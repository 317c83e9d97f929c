"""Jacobi trajectories recorded with the fast engine (a tiny Llama; a tiny Gemma-2 with window 8) are the
published loop's states: a subsequence of the states `reference_refine` passes through, from the draft's first
block to the same fixed point, which is the aligner's greedy answer."""
from pipeline.decoding.jacobi import RefineSettings, reference_refine
from pipeline.decoding.refiner import RefineRequest, Refiner
from pipeline.models import load_model
from pipeline.training.trajectories import jacobi_trajectories, trajectory_settings
from tests.tiny import WINDOW, save_tiny


class Recording:
    """A model wrapper that keeps the input ids of every forward pass: the reference loop's states."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids, **kw):
        self.inputs.append(input_ids[0].tolist())
        return self.model(input_ids=input_ids, **kw)


def test_gemma2_trajectories_are_the_reference_loop_states(tmp_path):
    lm = load_model(str(save_tiny("gemma2", tmp_path / "gemma2", seed=3)))
    settings = trajectory_settings(block_size=8, max_iter=50, max_new_tokens=40)
    refiner = Refiner(lm, settings, mode="fast")
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say something nice."}]
    reqs = [RefineRequest(msgs, "You are doing great, keep going and never give up on it.", key="1"),
            RefineRequest(msgs, "ok", key="2")]
    trajectories = jacobi_trajectories(refiner, reqs, max_states=1000)
    greedy = Refiner(lm, RefineSettings(max_new_tokens=40, reserve_tokens=0), mode="ar").refine(reqs[:1])[0].token_ids
    stops = set(lm.stop_ids)

    def cut(s):
        return s[:next((k for k, t in enumerate(s) if t in stops), len(s))]

    for req, tr in zip(reqs, trajectories):
        assert tr["converged"] and tr["fixed_point_ids"] == greedy, "every draft reaches the greedy answer"
        item = refiner.encode(req)
        assert len(item.prompt_ids) + len(greedy) > 5 * WINDOW, "the trajectory runs well past the window"
        rec = Recording(lm.model)
        res = reference_refine(rec, item, settings, lm.stop_ids, refiner.pad_id)
        assert res.token_ids == greedy
        expected = [cut(x[len(item.prompt_ids):]) for x in rec.inputs] + [res.token_ids]
        expected = [s for k, s in enumerate(expected) if k == 0 or s != expected[k - 1]]
        it = iter(expected)  # the reference states in order, less the passes that only confirm a block
        assert all(any(x == y for y in it) for x in tr["state_ids"]), "a subsequence of the reference loop's states"
        assert tr["state_ids"][0] == expected[0] and tr["state_ids"][-1] == expected[-1]
        assert tr["passes"] < res.passes


def test_jacobi_trajectories_run_from_the_answer_to_the_aligner_fixed_point(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    msgs = [{"role": "user", "content": "Say something."}]
    settings = trajectory_settings(block_size=6, max_iter=50, max_new_tokens=12)
    ref = Refiner(lm, settings, mode="fast")
    reqs = [RefineRequest(msgs, "abcdefghijkl", key="1"), RefineRequest(msgs, "zyx", key="2")]
    tr, tr2 = jacobi_trajectories(ref, reqs, max_states=100)
    greedy = Refiner(lm, RefineSettings(max_new_tokens=12), mode="ar").refine([RefineRequest(msgs, "x")])[0].text
    assert tr["converged"] and tr["fixed_point"] == greedy == tr["states"][-1], "a greedy Jacobi fixed point"
    assert tr2["fixed_point"] == greedy, "any draft converges to the same fixed point"
    assert tr["states"][0] == "abcdef", "state 0 is the answer's first block"
    assert len(tr["states"]) >= 3 and all(a != b for a, b in zip(tr["state_ids"], tr["state_ids"][1:]))
    assert tr["fixed_point_ids"] == tr["state_ids"][-1]

    item = ref.encode(reqs[0])
    rec = Recording(lm.model)
    res = reference_refine(rec, item, settings, lm.stop_ids, ref.pad_id)
    stops = set(lm.stop_ids)
    expected = [x[len(item.prompt_ids):] for x in rec.inputs]
    expected = [s[:next((k for k, t in enumerate(s) if t in stops), len(s))] for s in expected] + [res.token_ids]
    expected = [s for k, s in enumerate(expected) if k == 0 or s != expected[k - 1]]
    it = iter(expected)  # the published loop's states in order, less the passes that only confirm a block
    assert all(any(x == y for y in it) for x in tr["state_ids"]), "a subsequence of the published loop's states"
    assert tr["state_ids"][0] == expected[0] and tr["state_ids"][-1] == expected[-1]
    assert tr["passes"] < res.passes

    short = jacobi_trajectories(ref, reqs[:1], max_states=3)[0]
    assert len(short["states"]) == 3 and short["states"][0] == "abcdef" and short["states"][-1] == greedy
    long_prompt = [{"role": "user", "content": "word " * 5000}]
    bad = jacobi_trajectories(ref, [RefineRequest(long_prompt, "abc")], max_states=3)[0]
    assert "error" in bad and "context window" in bad["error"]
