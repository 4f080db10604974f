"""PyServ's benchmark: ``scripts/bench`` (``python -m bench``), not part of the test suite.

Every system under test sits behind one private Apache on 127.0.0.1 and is loaded by wrk
with the same settings, each load bounded in time; figures go into ``docs/benchmarks.rst``
and are never asserted. Modules, in the order data flows:

- ``harness``  the tests' Apache, pyservd and redis-server helpers, imported, not copied
- ``site``     the one Apache and every backend behind it (pyservd, two of them on Redis
  behind mod_proxy_balancer, flup, CGI, mod_fcgid)
- ``rows``     what a row is and how one is measured (wrk, CPU split, counter check)
- ``wrk``      running wrk and reading its figures; ``cpu``: CPU time from /proc
- ``sessions`` writing, ageing and sweeping many sessions in the real on-disk format
- ``scale``    the scale figures: 1k vs 1M stored sessions, sweep time, cache memory
- ``targets``  the goals the figures are compared with; ``report``: the RST report
"""
