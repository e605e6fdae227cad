"""Running a grid: options, cells, executors (local and Ray), the results store, run.json."""
