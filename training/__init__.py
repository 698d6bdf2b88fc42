"""Training side of digitgen (PyTorch): model, data, loop and checkpoints."""
