"""An example netdissection plugin — one component of every kind, to copy and rename:

- ``torchscript``: a backend for TorchScript files (``dissect model.ts``);
- ``npz``: a concept-set format, one ``.npz`` file (``--dataset set.npz``; ``dissect data convert --format npz``);
- ``fixed``: a threshold rule, one absolute threshold for every unit (``--threshold fixed
  --threshold-param value=0.5``);
- ``markdown``: a report writer, ``report.md`` (``--report markdown``);
- ``dissect npz-info PATH``: a command.

The hooks are in :mod:`netdissection_example.plugin`, declared in ``pyproject.toml``'s
``[project.entry-points.netdissection]``. Nothing here imports a framework at import time, so
``dissect plugins`` stays instant.
"""

__version__ = "0.1.0"
