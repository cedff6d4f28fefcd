//! The runtime: loads a compiled plan and its weights, and runs sessions with a KV cache.
