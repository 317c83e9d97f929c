"""The Serve application builder: ``import_path: serve_app.app:build_app`` in conf/serve.yaml.

Deployments: ``Ingress`` (FastAPI, OpenAI routes), one ``base-<name>`` per base model used by a route and one
``aligner-<name>`` per aligner used by a route. Their replicas, autoscaling and resources are set in the
``deployments:`` section of the Serve config by those names.
"""
from __future__ import annotations

from ray.serve import Application

from .aligner import Aligner
from .bases import HFBase, OpenAIBase
from .config import AppArgs, VLLMBaseArgs
from .ingress import Ingress


def _base(name: str, args) -> Application:
    if isinstance(args, VLLMBaseArgs):
        from .vllm_base import build_vllm_base  # optional extra, imported only when used
        return build_vllm_base(name, args)
    cls = HFBase if args.kind == "hf" else OpenAIBase
    return cls.options(name=f"base-{name}").bind(name, args.model_dump())


def build_app(args: dict) -> Application:
    cfg = AppArgs(**args)
    used_bases = sorted({r.base for r in cfg.models.values()})
    used_aligners = sorted({r.aligner for r in cfg.models.values() if r.aligner})
    bases = {n: _base(n, cfg.bases[n]) for n in used_bases}
    aligners = {n: Aligner.options(name=f"aligner-{n}").bind(n, cfg.aligners[n].model_dump())
                for n in used_aligners}
    return Ingress.bind(cfg.model_dump(), bases, aligners)
