"""quant-engine shared library: the only code shared between daemons."""
