"""bench: time .tflite files on this computer (bench.host) and on an Android phone (bench.device).

Entry point: `python -m bench` (bench/__main__.py). Submodules are imported on use so that
`python -m bench.worker` stays light.
"""

__all__ = ["device", "host", "parse", "report", "stats", "worker"]
