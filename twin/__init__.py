"""fleet-twin: a live digital twin of heterogeneous, disaggregated LLM-inference fleets."""

__version__ = "0.1.0"
