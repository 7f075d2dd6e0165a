"""Bundles written from a build folder for a server or client to load: the Triton model repository (``triton``)
and the onnxruntime-genai bundle (``genai``).

Import them as ``gamexport.bundles.<name>``; they read a build folder and write files, and run no model.
"""
