"""tests/nova: the Nova driver's tests, run in .venv-nova (nova installed).

- test_nova_imagebackend.py imports nova.tests (eventlet monkey-patching
  of the whole process) and uses testtools: never collected by pytest; it
  runs under ``python -m unittest`` in a process of its own
  (tests/functional/test_nova.py does that).
- test_nova_e2e.py is a pytest module that needs nova: collected only
  where nova imports (``.venv-nova/bin/python -m pytest tests/nova``);
  the main suite runs it in a subprocess (tests/functional/test_nova.py).
"""

import importlib.util

collect_ignore = ["test_nova_imagebackend.py"]
if importlib.util.find_spec("nova") is None:
    collect_ignore.append("test_nova_e2e.py")
