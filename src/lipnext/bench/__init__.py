"""Benchmarks behind ``lipnext bench``: model speed/memory/FLOPs (``models``), orthogonal
updates against the peer methods (``orthogonal``), the wall-clock budget race (``race``),
the training step against an unconstrained twin (``step``), FastExp and the manifold step
(``exp``), the optimizer per rank at scale (``scale``), FSDP memory per rank
(``fsdp_memory``) and the runs behind the baseline tables (``baselines``). Shared:
``timing`` (timers, memory, device peaks), ``results`` (JSON + Markdown output), ``ranks``
(spawned ranks)."""
