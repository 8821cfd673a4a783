"""The runtime wing: what a run needs from its surroundings, whichever job runs.

Owns run folders and atomic writes, output locks and run.json reading (outputs.py), several processes on
PyTorch's distributed stack (parallel.py), keeping freed CPU memory between steps (memory.py), and stopping
cleanly on SIGINT/SIGTERM (signals.py). Imports the standard library, torch, pandas/pyarrow (for Parquet
writes, on call) and ``attnprobe.errors``; no other wing.
"""
