"""Persona masks : Wanda-style, Contrastive-Wanda, Contrastive-Sparse, soft gates."""
from ..bitpack import pack_bits, unpack_bits
from ..hf import linear_weight
from .build import LAYER_SETS, MODES, MaskConfig, build_masks, layer_range
from .methods import (
                      block_mask,
                      contrastive_sparse_code_masks,
                      contrastive_sparse_masks,
                      contrastive_wanda_masks,
                      contrastive_z,
                      select,
                      soft_gate,
                      wanda_mask,
                      wanda_score,
)
from .store import MaskStore

__all__ = ["LAYER_SETS", "MODES", "MaskConfig", "layer_range", "MaskStore", "block_mask", "build_masks", "contrastive_sparse_code_masks",
           "contrastive_sparse_masks", "contrastive_wanda_masks",
           "contrastive_z", "linear_weight", "pack_bits", "select", "soft_gate", "unpack_bits", "wanda_mask", "wanda_score"]
