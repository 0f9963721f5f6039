"""The Django-free machine-learning core.

- `llm.chat`: the one chat format (conversation -> template text, tokens, loss mask,
  generation prompt, tool markup) that training, serving and statistics all call;
- `llm.train`: the training engine;
- `llm.serve`: the inference engine;
- `llm.bundled`: the base models shipped with the product.

Nothing here imports Django or an app, and `train` and `serve` do not import each other.
"""
