"""`loraforge serve`: one base model, many adapters, requests for different adapters and weighted mixes
batched in the same forward pass (text: `serve.text.TextEngine`)."""
