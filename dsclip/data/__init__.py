"""Training and evaluation data: synthetic shapes, CSV lists and class folders, WebDataset
shards (reading and writing), labelled sources, prompt templates."""
