"""Benchmarks of fmbseg's stages on this machine and device (``fmbseg bench``).

Real architectures at a chosen size with random weights (cost does not depend on weight
values), each case in a fresh process, ours beside a reference implementation in the same
rounds. Entry points: :func:`fmbseg.bench.harness.run_bench` with
:class:`fmbseg.bench.options.BenchOptions`, and :func:`fmbseg.bench.harness.command` with
:func:`fmbseg.bench.options.add_arguments` for the CLI. See docs/benchmarks.md.
"""
