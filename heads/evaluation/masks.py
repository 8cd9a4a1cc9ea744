"""Mask pasting and RLE encoding live in :mod:`cache_schema.masks`, because extraction pastes the
same masks to store their overlaps with the ground truth; this module keeps the old import path."""

from cache_schema.masks import MASK_THRESHOLD, encode_masks, paste_and_encode, paste_roi_masks

__all__ = ["MASK_THRESHOLD", "encode_masks", "paste_and_encode", "paste_roi_masks"]
