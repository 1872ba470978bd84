"""Real-model tasks whose oracle knows sequence-level and token-level truth (arith: arithmetic word problems)."""
