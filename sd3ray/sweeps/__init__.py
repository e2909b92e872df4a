"""Ray Tune sweeps: the spec (`spec`), the trials (`tuner`), the driver (`driver`) and the parent run's report
(`report`).
"""
