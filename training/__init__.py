"""Training GAM language models: data, tokenizer, presets, the loop with exact resume, and plots.

Modules (import them directly; this package imports nothing heavy by itself):

* ``gamexport.training.data`` — datasets → documents → token stream → batches
* ``gamexport.training.tokenizer`` — train the byte-level BPE tokenizer
* ``gamexport.training.presets`` — ``paper``, ``small``, ``tiny`` and ``demo`` recipes
* ``gamexport.training.loop`` — ``train(dataset, preset, out, ...)``, the entry point of ``gamexport train``
* ``gamexport.training.plots`` — loss and perplexity PNGs from metrics.jsonl
"""
