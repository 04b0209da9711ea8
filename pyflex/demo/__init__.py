"""The demo (``python -m pyflex.demo``, in ``__main__.py``) and the harness it shares with bench/profile_model.py.

* ``methods.py``: the one table of fine-tuning methods (how each patches, schedules and builds its optimizer);
* ``harness.py``: model building, device and versions, one timed training step, peak memory, running one method in
  isolation, progress bars, text tables;
* ``plots.py``: the pictures of a demo run and of a profile.

Nothing here is imported by ``import pyflex``; nothing below this package imports it.
"""
