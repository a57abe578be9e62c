"""The streaming worker, one module per stage in the order an event moves: intake,
batching, inference, delivery, offsets, commit; ``worker`` wires them together."""
