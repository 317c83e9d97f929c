"""Turning (conversation, draft) into the aligner's token ids, with the tokenizer's own chat template.

Two layouts:
* **chat** (DiffPO reference): the conversation, then the draft as the assistant's answer. The
  aligner's context ends at the assistant header; the draft tokens follow and seed the Jacobi state.
* **in_context** (Aligner-style correction): one user turn built from a correction template holding the
  question and the draft; the draft also seeds the Jacobi state, so it shapes the answer and the speed.

Templates without a system role (Gemma's raises "System role not supported") get a leading system message
merged into the first user turn, the way Gemma-3's own template does it: system text, a blank line, user text.
A BOS token comes from the template alone (transformers tokenizes the rendered chat without adding specials).
"""
from __future__ import annotations

from jinja2 import TemplateError

DEFAULT_CORRECTION_TEMPLATE = (
    "Here is a question and a draft answer. Rewrite the draft into a better answer: keep what is correct "
    "and useful, fix mistakes, remove anything harmful or off-topic. Reply with the improved answer only.\n\n"
    "### Question\n{question}\n\n### Draft answer\n{draft}"
)

# Used only for tokenizers that ship no chat template (e.g. plain GPT-2).
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

VALID_ROLES = ("system", "user", "assistant")


def check_messages(messages) -> None:
    """Raise ValueError with a clear reason if `messages` is not a usable chat ending in a user turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must have 'role' and 'content'")
        if m["role"] not in VALID_ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's turn")
    if not messages[-1]["content"].strip():
        raise ValueError("the user's message is empty")


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of the conversation up to and including the assistant header.

    A conversation the chat template refuses is a ValueError with the template's reason; a leading system
    message it refuses is merged into the first user turn first (`merge_system`)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return _template_ids(tokenizer, messages)
        except TemplateError as e:
            refused = e
        if messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
            try:
                return _template_ids(tokenizer, merge_system(messages))
            except TemplateError as e:
                refused = e
        raise ValueError(f"the aligner's chat template refuses this conversation: {refused}") from None
    text = "".join(f"{_PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


def _template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # some versions return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def merge_system(messages) -> list[dict]:
    """The conversation with its leading system message moved to the head of the first user turn."""
    system, first, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def answer_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def in_context_messages(messages, draft: str, template: str = DEFAULT_CORRECTION_TEMPLATE) -> list[dict]:
    """The correction request: earlier turns stay as they are, the last user turn carries the draft."""
    *history, last = messages
    return list(history) + [{"role": "user", "content": template.format(question=last["content"], draft=draft)}]


def check_template(template: str) -> None:
    try:
        template.format(question="q", draft="d")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"correction template must use only {{question}} and {{draft}} fields: {e}") from None
    if "{draft}" not in template or "{question}" not in template:
        raise ValueError("correction template must contain both {question} and {draft}")
