"""The DeepSpeed config of a consistency-training engine, as the dict `deepspeed.initialize(config=...)` takes.

The optimizer and the learning-rate scheduler are not in it: the trainer builds them as torch objects and
hands them to `deepspeed.initialize`, so nothing needs DeepSpeed's fused-op builds (which CPU runs lack).
"""
from __future__ import annotations


def deepspeed_config(*, zero_stage: int, precision: str, micro_batch: int, grad_accum: int, grad_clip: float,
                     bucket_size: int, offload_optimizer: bool) -> dict:
    """ZeRO `zero_stage` (0-3) with `precision` fp32 | bf16 | fp16, `micro_batch` examples per rank per
    forward and `grad_accum` micro-batches per optimizer step, gradients clipped to norm `grad_clip`.

    `bucket_size` (elements) sizes ZeRO's gradient-reduce and all-gather buckets: DeepSpeed's own default,
    5e8, allocates a 2 GB fp32 staging buffer per rank, more than a small model's whole state.
    `offload_optimizer` keeps the optimizer state in CPU memory (ZeRO-2/3). ZeRO-3 gathers the partitioned
    weights when the model is saved, so `save_16bit_model` writes a whole model."""
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(reduce_bucket_size=int(bucket_size), allgather_bucket_size=int(bucket_size))
    if zero_stage >= 2 and offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
