"""Sparse weight formats for masked_linear (BRIEF 3)."""
from .base import WeightFormat, pack_words, unpack_words
from .bitmap import BitmapWeight
from .block import BlockSparseWeight, block_mask
from .compacted import CompactedWeight
from .semi_structured import SemiStructuredUnsupported, SemiStructuredWeight
from .shared_bitmask import SharedBitmask

__all__ = ["BitmapWeight", "BlockSparseWeight", "CompactedWeight", "SemiStructuredUnsupported", "SemiStructuredWeight",
           "SharedBitmask", "WeightFormat", "block_mask", "pack_words", "unpack_words"]
