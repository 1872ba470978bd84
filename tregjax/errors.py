"""The expected errors more than one layer raises (standard library only, so any module, `cli` included, can import it).

`tregjax.cli` maps each to its exit status by class name (docs/bad_input.md); every raiser imports it from here.
"""


class ConfigError(ValueError):
  """A configuration that cannot run, found before anything is built or compiled (names the config key)."""


class StaleCacheError(ValueError):
  """Outputs (a scored cache, generated pairs, a stage) made from other inputs than the ones the caller expects."""


class PeerLostError(RuntimeError):
  """Another process of a multi-process job is gone, or never joined (tregjax.peers): the job cannot go on, only be
  rerun; what it wrote is kept."""


__all__ = ["ConfigError", "StaleCacheError", "PeerLostError"]
