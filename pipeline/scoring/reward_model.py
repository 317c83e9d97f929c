"""A Hugging Face sequence-classification reward model, shared by build_states (ranking answers) and the
evaluation (reward judge)."""
from __future__ import annotations

# ---- a Hugging Face reward model --------------------------------------------------------------------
class RewardModel:
    """Pointwise reward r(prompt, answer) from an ``AutoModelForSequenceClassification``.

    The conversation plus the answer as the assistant's turn is rendered with the tokenizer's chat template
    (plain "User: ... Assistant: ..." text when it has none) and the logit ``label_index`` is the score.
    One call scores the answers of one prompt together, so a row's scores never depend on how the job
    happened to batch rows. Sequences longer than ``max_length`` tokens are truncated (right side).
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

    def render(self, messages: list[dict], answer: str) -> str:
        conv = list(messages) + [{"role": "assistant", "content": answer}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(conv, tokenize=False)
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        return "".join(f"{names[m['role']]}: {m['content']}\n" for m in conv)

    def score(self, messages: list[dict], answers: list[str]) -> list[float]:
        import torch

        if not answers:
            return []
        texts = [self.render(messages, a) for a in answers]
        has_template = bool(getattr(self.tok, "chat_template", None))
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                       add_special_tokens=not has_template)  # a chat template writes its own special tokens
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        return [float(x) for x in logits[:, self.label_index].float().cpu().tolist()]
