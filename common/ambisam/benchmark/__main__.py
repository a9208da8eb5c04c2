"""A benchmark job's own process: ``python -m ambisam.benchmark JOB.json`` (see :func:`ambisam.benchmark.jobs.job_main`)."""

import sys

from ambisam.benchmark.jobs import job_main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ambisam.benchmark JOB.json")
    job_main(sys.argv[1])
