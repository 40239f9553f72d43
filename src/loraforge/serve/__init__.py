"""`loraforge serve`: one base model (a text model or an image pipeline) served with many adapters,
requests for different adapters and weighted mixes batched into the same forward pass."""
