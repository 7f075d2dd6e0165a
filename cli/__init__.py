"""The ``gamexport`` command: thin typer commands over library functions (one module per command)."""
