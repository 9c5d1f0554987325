"""One module per compression method, named after it (`method: smoothquant-w8a8` lives in
`smoothquant_w8a8.py`): the method's spec class, which carries its fields, `apply`, and the
engines that serve it. `slimserve.compression.specs` lists them. No module here imports torch
at import time."""
