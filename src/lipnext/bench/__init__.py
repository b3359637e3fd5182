"""Benchmarks: model speed/memory/FLOPs (``models``), orthogonal updates (``orthogonal``)
and the wall-clock budget race (``race``). Used by ``lipnext bench``."""
