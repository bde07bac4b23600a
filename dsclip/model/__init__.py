"""The model: architectures by name, building, initial weights, position-embedding resize,
freeze masks and the layer partition they share."""
