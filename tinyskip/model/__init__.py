"""The decoder and what hangs off it: transformer, KV cache, exit heads, exit modules, exit classifier."""
