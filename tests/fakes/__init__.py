"""Fakes for unit tests: a scripted QMP server and fake VMM API servers."""
