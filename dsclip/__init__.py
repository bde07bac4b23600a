"""dsclip: fine-tune OpenCLIP models at scale with DeepSpeed ZeRO-3."""
__version__ = "0.1.0"
