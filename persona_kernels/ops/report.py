"""The kernels part of ``persona-kernels env``: what 'auto' runs for every op here, and why a
backend is missing (import errors and fallbacks recorded by the registry)."""
from __future__ import annotations

import torch

from .. import backends
from ..formats import FORMAT_KINDS
from . import registry
from .masked_linear.dispatch import describe_table, fallback_route


def report() -> str:
    """What 'auto' runs for each op on the CPU (and the GPU when there is one), and every fallback."""
    lines = ["kernels ('auto' per device; '*' marks a fallback):"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in registry.OPS:
        for fmt in (FORMAT_KINDS if op == "masked_linear" else (None,)):
            picks = []
            for dev in devices:
                pick = registry.resolve(op, "auto", dev, fmt)
                if pick == "reference":
                    pick = (f"{fallback_route(fmt)} GEMM" if op == "masked_linear" else "reference") + "*"
                picks.append(f"{dev.type}: {pick}")
            label = op + (f"[{fmt}]" if fmt else "")
            lines.append(f"  {label:<30} {', '.join(picks):<30} kernels: {', '.join(registry.kernel_backends(op, fmt))}")
    lines += [f"  {describe_table(dev)}" for dev in devices]
    for key, why in sorted(registry.LOAD_ERRORS.items()):
        lines.append(f"  load error {key}: {why}")
    for (op, fmt, dev), why in sorted(registry.FALLBACKS.items(), key=str):
        lines.append(f"  fallback {op}{'[' + fmt + ']' if fmt else ''} on {dev}: {why}")
    return "\n".join(lines)


def env_report() -> str:
    """``persona-kernels env``: versions, which backends run here and why not, and every op's kernels."""
    return backends.report() + "\n" + report()
