"""mcpft: agent traces -> curated data -> LoRA SFT -> before/after evaluation."""

__version__ = "0.1.0"
