"""Runners that train a population: in this process, or with persistent storage and workers."""
