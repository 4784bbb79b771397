"""Unit tests of the proxy's core and parsing: no Triton, no server, a fake gateway where one is
needed. They run in seconds: ``make test-unit``."""
