"""Experiments: stages cached in a workdir -> arms -> evaluation -> report."""
