"""Weight-space ensembling: WiSE-FT mixes of a zero-shot and a fine-tuned model."""
