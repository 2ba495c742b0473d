"""Scripts that print the project's measured figures, and the helpers the tests share with them.

Run each from the repository root as a module::

    python -m benchmarks.bench_app          # the app: cold start, /analyze latency, load, memory
    python -m benchmarks.soak_app           # 10 minutes of mixed valid and invalid requests
    python -m benchmarks.fuzz_inputs        # fuzz the upload surface
    python -m benchmarks.fault_injection    # SIGKILL training and dataset generation, then resume

`app_server` (start ``python app.py`` on a free port) and `cases` (the app's bad inputs) are imported
by the tests as well; the tests run short versions of the same functions.
"""
