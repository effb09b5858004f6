"""Attention methods, one folder each.

Every folder holds ``reference.py`` (the NumPy textbook version), ``numba.py``
(CPU kernels), ``cupy.py`` (GPU, written against an array namespace with
``numba.cuda`` kernels) and an ``__init__.py`` with the method's
:class:`~eff_attn.registry.Method` record, its parameter resolution, its
``flops`` and its public ``<name>_attention`` function.
"""
