"""Tools around the library, not part of the training API: generated CellMap-layout data
(:mod:`~cellmap_data.tools.synthetic`), the benchmarks behind ``python -m cellmap_data bench``
(:mod:`~cellmap_data.tools.bench`, :mod:`~cellmap_data.tools.bench_crops`,
:mod:`~cellmap_data.tools.bench_write`), the demo (:mod:`~cellmap_data.tools.demo`) and a
loopback HTTP server for remote-store benchmarks and tests (:mod:`~cellmap_data.tools.loopback`).

Nothing here is imported by ``import cellmap_data``; import the module you need.
"""
