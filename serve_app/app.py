"""The Serve application builder: ``import_path: serve_app.app:build_app`` in conf/serve.yaml.

Deployments: ``Ingress`` (FastAPI, OpenAI routes), one ``base-<name>`` per base model used by a route and one
``aligner-<name>`` per aligner used by a route. Their replicas, autoscaling and resources are set in the
``deployments:`` section of the Serve config by those names. A model on vLLM (base or aligner
`engine: vllm`) adds its Ray Serve LLM server, ``llm-base-<name>`` / ``llm-aligner-<name>`` (serve_app/vllm.py),
whose engine, placement and autoscaling come from the model's own args; models with the same engine settings
share one server (the first one's name).
"""
from __future__ import annotations

import json

from ray.serve import Application

from .aligner import Aligner
from .bases import HFBase, OpenAIBase
from .config import ENGINE_KEYS, AppArgs, EngineArgs, VLLMBaseArgs, validate_args
from .ingress import Ingress


class _Servers:
    """The Ray Serve LLM servers of the graph, one per distinct engine setting: a vLLM base and a vLLM aligner
    that run the same model with the same settings share one server (one engine, its memory paid once)."""

    def __init__(self):
        self.built: dict[str, tuple[str, Application]] = {}

    def get(self, role: str, name: str, args: EngineArgs) -> tuple[str, Application]:
        from .llm_server import llm_server  # vLLM is imported only where a model runs on it

        key = json.dumps(args.model_dump(include=ENGINE_KEYS), sort_keys=True, default=str)
        if key not in self.built:
            model_id = f"llm-{role}-{name}"
            self.built[key] = model_id, llm_server(model_id, args.model, args, args.deployment_config,
                                                   vectors=dict(args.vectors) or None)
        return self.built[key]


def _base(name: str, args, options: dict, servers: _Servers) -> Application:
    opts = options.get(f"base-{name}", {})
    if isinstance(args, VLLMBaseArgs):
        from .vllm import VLLMBase
        return VLLMBase.options(name=f"base-{name}", **opts).bind(name, args.model_dump(),
                                                                  *servers.get("base", name, args))
    cls = HFBase if args.engine == "hf" else OpenAIBase
    return cls.options(name=f"base-{name}", **opts).bind(name, args.model_dump())


def _aligner(name: str, args, options: dict, servers: _Servers) -> Application:
    opts = options.get(f"aligner-{name}", {})
    if args.engine == "vllm":
        from .vllm import VLLMAligner
        return VLLMAligner.options(name=f"aligner-{name}", **opts).bind(name, args.model_dump(),
                                                                        *servers.get("aligner", name, args))
    return Aligner.options(name=f"aligner-{name}", **opts).bind(name, args.model_dump())


def build_graph(cfg: AppArgs, options: dict | None = None) -> Application:
    """The bound graph; `options` maps deployment names to `.options()` (for tests and Python users; YAML users
    set the same things in the config's `deployments:` section)."""
    options, servers = options or {}, _Servers()
    used_bases = sorted({r.base for r in cfg.models.values()})
    used_aligners = sorted({r.aligner for r in cfg.models.values() if r.aligner})
    bases = {n: _base(n, cfg.bases[n], options, servers) for n in used_bases}
    aligners = {n: _aligner(n, cfg.aligners[n], options, servers) for n in used_aligners}
    return Ingress.options(**options.get("Ingress", {})).bind(cfg.model_dump(), bases, aligners,
                                                              serving_deployments(cfg, servers))


def serving_deployments(cfg: AppArgs, servers: _Servers) -> dict[str, str]:
    """Route -> the deployment whose replicas serve its answers (its aligner's, or its base's on a bare route; the
    LLM server on vLLM): admission runs `admission.max_concurrent` requests per replica of it."""
    out = {}
    for route, r in cfg.models.items():
        role, name = ("aligner", r.aligner) if r.aligner else ("base", r.base)
        args = cfg.aligners[name] if r.aligner else cfg.bases[name]
        out[route] = servers.get(role, name, args)[0] if args.engine == "vllm" else f"{role}-{name}"
    unknown = sorted(set(cfg.admission.max_concurrent_of) - set(out.values()))
    if unknown:
        raise ValueError(f"admission.max_concurrent_of: {unknown} serve no route; the serving deployments are "
                         f"{sorted(set(out.values()))}")
    return out


def build_app(args: dict) -> Application:
    """Serve's app builder: `args` is the application's `args:` block of the Serve config (one error with every
    problem, before anything starts)."""
    return build_graph(validate_args(args, "(the application's args)"))
