"""persona-kernels: fast kernels for persona subnetworks in transformers LLMs."""
from ._native import BackendUnavailable
from ._version import __version__
from .calibrate import CalibrationConfig, CalibrationResult, calibrate
from .export import bake, export
from .masks import MaskConfig, MaskStore, build_masks
from .model import (
    apply,
    apply_neurons,
    apply_steering,
    is_applied,
    persona,
    remove,
    set_batch_personas,
    set_gamma,
    set_persona,
    set_steering_strength,
)
from .npti import NeuronSet, identify_neurons
from .ops import library as _library  # noqa: F401,E402 (registers torch.ops.persona_kernels.*)
from .ops.accumulate_stats import NonFiniteActivationError, accumulate_stats
from .ops.induce_neurons import induce_neurons
from .ops.masked_linear import masked_linear
from .packs import export_pack, load_pack
from .sparse_checkpoint import import_masks
from .stats import StatsConfig, StatsState
from .steering import SteeringVectors, project, steering_vectors, text_projections

__all__ = ["__version__", "BackendUnavailable", "CalibrationConfig", "CalibrationResult", "MaskConfig", "MaskStore",
           "NeuronSet", "NonFiniteActivationError", "StatsConfig", "StatsState", "accumulate_stats", "apply",
           "apply_neurons", "bake", "export", "build_masks", "calibrate", "export_pack", "import_masks", "load_pack",
           "identify_neurons", "induce_neurons", "is_applied", "masked_linear", "persona", "remove",
           "set_batch_personas", "set_gamma", "set_persona", "SteeringVectors", "apply_steering", "project",
           "set_steering_strength", "steering_vectors", "text_projections"]
