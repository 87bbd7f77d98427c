"""What every part of the pipeline shares: the command-line layer, file IO, provenance."""
