"""A Hugging Face sequence-classification reward model, shared by build_states (ranking answers) and the
evaluation (reward judge)."""
from __future__ import annotations

# ---- a Hugging Face reward model --------------------------------------------------------------------
class RewardModel:
    """Pointwise reward r(prompt, answer) from an ``AutoModelForSequenceClassification``.

    The conversation plus the answer as the assistant's turn is rendered with the tokenizer's chat template
    (plain "User: ... Assistant: ..." text when it has none) and the logit ``label_index`` is the score.
    One call scores the answers of one prompt together, so a row's scores never depend on how the job
    happened to batch rows. A sequence longer than the limit (``max_length``, and the model's own
    ``max_position_embeddings`` when smaller) is refused, never truncated: a truncated answer would be scored
    on its beginning only. `too_long` names the answers that do not fit; `score` raises ValueError for them.
    """

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                 label_index: int = 0, max_length: int = 4096):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.models import pick_device, pick_dtype, resolve_model_path

        path, gguf = resolve_model_path(spec)
        if gguf:
            raise ValueError("a reward model must be a Hugging Face folder or hub id, not a .gguf file")
        dev = pick_device(device)
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code).to(dev).eval()
        if self.model.config.pad_token_id is None:  # needed to find each row's last token in a padded batch
            self.model.config.pad_token_id = self.tok.pad_token_id
        n = self.model.config.num_labels
        if not 0 <= label_index < n:
            raise ValueError(f"label_index {label_index} but the reward model has {n} output(s)")
        self.label_index, self.max_length = label_index, max_length
        window = getattr(self.model.config, "max_position_embeddings", None)
        self.limit = min(max_length, window) if window else max_length

    def render(self, messages: list[dict], answer: str) -> str:
        conv = list(messages) + [{"role": "assistant", "content": answer}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(conv, tokenize=False)
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        return "".join(f"{names[m['role']]}: {m['content']}\n" for m in conv)

    def _encode(self, messages: list[dict], answers: list[str]):
        has_template = bool(getattr(self.tok, "chat_template", None))
        return self.tok([self.render(messages, a) for a in answers],
                        add_special_tokens=not has_template)  # a chat template writes its own special tokens

    def _reasons(self, enc) -> list[str | None]:
        return [None if len(ids) <= self.limit else
                f"the reward model's input (conversation + answer) of {len(ids)} tokens exceeds its limit of "
                f"{self.limit} tokens" for ids in enc["input_ids"]]

    def too_long(self, messages: list[dict], answers: list[str]) -> list[str | None]:
        """Per answer, why the reward model cannot score it (conversation + answer past its limit), or None."""
        return self._reasons(self._encode(messages, answers)) if answers else []

    def score(self, messages: list[dict], answers: list[str]) -> list[float]:
        """The reward of each answer to the conversation; ValueError if one of them does not fit (`too_long`)."""
        import torch

        if not answers:
            return []
        enc = self._encode(messages, answers)
        bad = next((r for r in self._reasons(enc) if r), None)
        if bad:
            raise ValueError(bad)
        enc = self.tok.pad(enc, return_tensors="pt")
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        return [float(x) for x in logits[:, self.label_index].float().cpu().tolist()]
