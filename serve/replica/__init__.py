"""One variant's replica: load, compress, start an engine, benchmark itself, score references."""
