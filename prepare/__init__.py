"""Scripts that create data/<dataset> (run them as `python prepare/NAME.py`), and their shared helpers."""
