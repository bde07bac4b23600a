"""Training: process bootstrap, DeepSpeed config and engine, optimizer and schedule, the
components of a run, the loop, checkpoints (save, resume) and export."""
