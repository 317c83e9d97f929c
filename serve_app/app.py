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


def _base(name: str, args, options: dict) -> Application:
    if isinstance(args, VLLMBaseArgs):
        from .vllm_base import build_vllm_base  # optional extra, imported only when used
        return build_vllm_base(name, args)
    cls = HFBase if args.kind == "hf" else OpenAIBase
    return cls.options(name=f"base-{name}", **options.get(f"base-{name}", {})).bind(name, args.model_dump())


def build_graph(cfg: AppArgs, options: dict | None = None) -> Application:
    """The bound graph; `options` maps deployment names to `.options()` (for tests and Python users; YAML users
    set the same things in the config's `deployments:` section)."""
    options = options or {}
    used_bases = sorted({r.base for r in cfg.models.values()})
    used_aligners = sorted({r.aligner for r in cfg.models.values() if r.aligner})
    bases = {n: _base(n, cfg.bases[n], options) for n in used_bases}
    aligners = {n: Aligner.options(name=f"aligner-{n}", **options.get(f"aligner-{n}", {}))
                .bind(n, cfg.aligners[n].model_dump()) for n in used_aligners}
    return Ingress.options(**options.get("Ingress", {})).bind(cfg.model_dump(), bases, aligners)


def build_app(args: dict) -> Application:
    """Serve's app builder: `args` is the application's `args:` block of the Serve config."""
    return build_graph(AppArgs(**args))
