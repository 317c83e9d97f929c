"""The aligner's training objective: L = w_ar * L_AR + w_con * L_Con (CLLM-style consistency training).

One example is a conversation, the target answer y(T) (the best-ranked one, or the reference) and one
worse answer state y(t) — or, CLLM's own recipe, the aligner's Jacobi fixed point as the target and one
intermediate state of its Jacobi trajectory towards it (`make_trajectory_example`). Two sequences share
the prompt:

    teacher  prompt + y(T)                         (the fixed point Jacobi decoding should reach)
    student  prompt + y(t) laid over y(T)'s positions (cut to its length, or filled with the pad id,
             exactly as the engine fills a Jacobi block from a draft)

* L_AR  — cross-entropy of the teacher sequence's answer tokens (y(T) and its stop token) given the prompt,
           optionally label-smoothed.
* L_Con — soft cross-entropy from the teacher's logits (stop-gradient) to the student's logits at every
           answer position, so the aligner learns to map any worse state to the target in one pass.
           Masked: the prompt, batch padding, and the positions whose context is identical in both
           sequences (the common prefix of y(t) and y(T)), where the two predictions coincide anyway.
           Averaged over the unmasked positions of the batch (CLLM's "global" consistency loss).

The teacher logits come from the same forward pass that gives L_AR, detached, so one step costs two
forward passes and one backward. Optionally (`reference=`, a frozen copy of the model training started from)
the consistency targets come from that fixed model instead, and a third term keeps the model's own answer
distribution where it was:

* L_KD  — soft cross-entropy from the reference model's logits to the model's logits on the teacher
           sequence's answer positions (distillation from the initial aligner).

With a self teacher, every step moves the targets too; a frozen reference keeps them fixed (one more
forward pass per step, without gradient). On the CPU recipe it did not stop the 135M aligner's drift into
repetitive text (README, "CLLM-style trajectories on the CPU"). Both engine modes get matching inputs: in
draft-in-context mode the prompt also shows y(t) through the correction template, for the teacher and the
student alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE, answer_ids, chat_prompt_ids, in_context_messages


@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]  # y(T) answer tokens, ending with the stop token (unless cut at the length cap)
    state_ids: list[int]  # y(t) answer tokens, same length as target_ids (cut or pad-filled)
    state_len: int | None = None  # real state tokens (trajectory states); predictions past them are not trained


def make_example(tokenizer, messages: list[dict], target: str, state: str, stop_id: int, pad_id: int,
                 max_answer_tokens: int, in_context: bool = False,
                 template: str = DEFAULT_CORRECTION_TEMPLATE) -> Example:
    msgs = in_context_messages(messages, state, template) if in_context else messages
    prompt = chat_prompt_ids(tokenizer, msgs)
    tgt = answer_ids(tokenizer, target)[: max(0, max_answer_tokens - 1)] + [stop_id]
    st = answer_ids(tokenizer, state)[: len(tgt)]
    st += [pad_id] * (len(tgt) - len(st))
    return Example(prompt, tgt, st)


def make_trajectory_example(tokenizer, messages: list[dict], fixed_point_ids: list[int], ended: bool,
                            state_ids: list[int], stop_id: int, pad_id: int, max_answer_tokens: int,
                            in_context: bool = False, draft: str = "",
                            template: str = DEFAULT_CORRECTION_TEMPLATE) -> Example:
    """A CLLM example from a Jacobi trajectory: the target is the aligner's fixed point (its stop token only
    if it ended there), the state one of the passes' intermediate states (answer so far + Jacobi block).
    Token ids are used as recorded, so the state lines up with the target exactly as in the engine; the
    consistency loss covers only predictions made from real state tokens (the block's end, not padding)."""
    msgs = in_context_messages(messages, draft, template) if in_context else messages
    prompt = chat_prompt_ids(tokenizer, msgs)
    tgt = (list(fixed_point_ids) + ([stop_id] if ended else []))[:max_answer_tokens]
    st = list(state_ids)[: len(tgt)]
    n = len(st)
    return Example(prompt, tgt, st + [pad_id] * (len(tgt) - n), state_len=n)


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def collate(examples: list[Example], pad_id: int, con_horizon: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded teacher/student inputs, the attention mask, AR labels and the consistency mask.

    Both label tensors are aligned with the logits: position j predicts token j+1. `con_horizon` = N keeps
    only the first N consistency positions after the common prefix (the tokens a Jacobi pass could accept
    next, beside the one it always gets right); None keeps them all (CLLM's global loss).
    """
    width = max(len(e.prompt_ids) + len(e.target_ids) for e in examples)
    B = len(examples)
    teacher = torch.full((B, width), pad_id, dtype=torch.long)
    student = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    con_mask = torch.zeros((B, width), dtype=torch.bool)
    for b, e in enumerate(examples):
        P, n = len(e.prompt_ids), len(e.target_ids)
        teacher[b, :P + n] = torch.tensor(e.prompt_ids + e.target_ids)
        student[b, :P + n] = torch.tensor(e.prompt_ids + e.state_ids)
        attention[b, :P + n] = 1
        labels[b, P - 1:P + n - 1] = torch.tensor(e.target_ids)
        k = common_prefix(e.state_ids, e.target_ids)  # answer positions i <= k see identical contexts
        end = P + n - 1 if e.state_len is None else min(P + n - 1, P + e.state_len)
        if con_horizon is not None:
            end = min(end, P + k + con_horizon)
        con_mask[b, P - 1 + k + 1:end] = True
    return {"teacher_ids": teacher, "student_ids": student, "attention_mask": attention, "labels": labels,
            "con_mask": con_mask}


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of -sum_v p_teacher(v) log p_student(v); 0 if nothing is masked in."""
    if not mask.any():
        return student_logits.sum() * 0.0  # keeps the graph (DeepSpeed wants a backward every step)
    s = F.log_softmax(student_logits[mask].float(), dim=-1)
    t = F.softmax(teacher_logits[mask].float(), dim=-1)
    return -(t * s).sum(-1).mean()


def losses(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
           reference=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_AR, L_Con, L_KD) for one collated batch; no gradient flows through the consistency targets.
    Without a `reference` model the targets are the model's own detached teacher logits and L_KD is 0."""
    attn = batch["attention_mask"]
    t_logits = model(input_ids=batch["teacher_ids"], attention_mask=attn).logits
    V = t_logits.shape[-1]
    l_ar = F.cross_entropy(t_logits.float().view(-1, V), batch["labels"].view(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)
    if reference is None:
        targets, l_kd = t_logits.detach(), t_logits.new_zeros(())
    else:
        with torch.no_grad():
            targets = reference(input_ids=batch["teacher_ids"], attention_mask=attn).logits
        answer = batch["labels"] != -100  # the positions that predict the target answer's tokens
        l_kd = soft_cross_entropy(t_logits, targets, answer)
    s_logits = model(input_ids=batch["student_ids"], attention_mask=attn).logits
    l_con = soft_cross_entropy(s_logits, targets, batch["con_mask"])
    return l_ar, l_con, l_kd
