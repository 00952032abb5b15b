"""Benchmark images come from the product's own sample generator (also used by `make run`)."""

from cachepoint.samples import BLOCK, block_kinds, generate, make_block, mutate, text_block

__all__ = ["BLOCK", "block_kinds", "generate", "make_block", "mutate", "text_block"]
