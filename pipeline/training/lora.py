"""LoRA adapters (peft) for consistency training: only the adapters train, and the trained model is written
back as a plain model of the architecture it started from (`merged`)."""
from __future__ import annotations


def with_lora(model, *, r: int, alpha: float, dropout: float, target_modules: str, gradient_checkpointing: bool):
    """`model` wrapped with rank-`r` LoRA adapters (update scale alpha / r) on `target_modules`: "all-linear"
    (peft's name for every linear layer but the output head) or a comma-separated list of module names.
    `gradient_checkpointing`: the model's blocks are checkpointed, so their input must require grad for the
    backward pass to reach the adapters."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    conf = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=targets)
    return get_peft_model(model, conf)


def merged(model):
    """The model to save: LoRA adapters folded into the weights they adapt; any other model as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
