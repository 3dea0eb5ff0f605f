"""Analyses: pure computation returning tidy tables; they never print, write files or plot.

One module per command (``analyses/<command>.py``), a subpackage where a command's family has
several modules. The public names are re-exported by :mod:`headlab`.
"""
