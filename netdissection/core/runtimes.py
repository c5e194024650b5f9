"""The names ``--runtime`` takes (a module of its own: the CLI offers them without importing NumPy or torch).

A torch backend runs them (``plugins/backends/runtime.py``); a backend lists the ones it offers in
``Backend.runtimes``.
"""

#: ``--runtime``: what runs a torch model's forward pass (the backends that offer a choice list theirs).
RUNTIMES = ("torch", "onnxruntime", "auto")
RUNTIME_HELP = ("What runs the forward pass of a torch model: torch (its own eager code), onnxruntime (exported "
                "in memory; needs the onnx extra), or auto (whichever is faster here, timed on the first batch). "
                "Each runtime's maps are checked against torch's on the first batch.")
