"""Where metrics go: metrics.jsonl, TensorBoard, Weights & Biases, and PNG plots."""
