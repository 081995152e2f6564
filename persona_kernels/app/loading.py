"""Loading a model for the app layer: the built-in persona model, a local HF directory or a hub id."""
from __future__ import annotations

BUILTIN = "builtin"


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """'builtin' (the package's trained persona model), a local HF model directory, or a hub id.

    ``device='auto'`` splits a HF model over the visible GPUs with ``device_map='auto'`` (needs
    accelerate; the persona layer builds each layer's format on that layer's device); the
    built-in model goes to the GPU if there is one. Inputs go to ``input_device(model)``.
    """
    import torch

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if spec == BUILTIN:
        from ..builtin import load_builtin_model

        model, tok = load_builtin_model(dt)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return model.to(device), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = {}
    if device == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ValueError("--device auto splits the model with a device_map, which needs accelerate: "
                             "pip install 'persona-kernels[device-map]'") from None
        split = {"device_map": "auto"}
    try:
        tok = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, **split)
    except OSError as exc:
        raise ValueError(f"cannot load model {spec!r}: not a local model directory, and the hub is not reachable "
                         f"or has no such model ({exc.__class__.__name__})") from None
    return (model if split else model.to(device)).eval(), tok


def input_device(model):
    """Where a model's inputs go: the device of its first parameter (the embeddings)."""
    return next(model.parameters()).device
