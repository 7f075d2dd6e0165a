"""Bundles written from a finished build folder for a server to load: the Triton model repository (``triton``).

Import them as ``gamexport.bundles.<name>``; they read a build folder and write files, and run no model.
"""
