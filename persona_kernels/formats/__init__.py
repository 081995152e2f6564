"""Sparse weight formats for masked_linear: bitmap, shared bitmask, compacted, block, 2:4."""
from .base import WeightFormat
from .bitmap import BitmapWeight
from .block import BlockSparseWeight
from .compacted import CompactedWeight
from .semi_structured import SemiStructuredUnsupported, SemiStructuredWeight
from .shared_bitmask import SharedBitmask

FORMAT_CLASSES = {cls.kind: cls for cls in (BitmapWeight, SharedBitmask, CompactedWeight, BlockSparseWeight, SemiStructuredWeight)}
FORMAT_KINDS = tuple(FORMAT_CLASSES)

__all__ = ["FORMAT_CLASSES", "FORMAT_KINDS",
           "BitmapWeight", "BlockSparseWeight", "CompactedWeight", "SemiStructuredUnsupported", "SemiStructuredWeight",
           "SharedBitmask", "WeightFormat"]
