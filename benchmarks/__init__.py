"""Speed and scale measurements (scripts, not tests): ``python -m benchmarks.run_all``; see RESULTS.md."""
