"""Development and test infrastructure: run real rspamd, clamd and spamd on this machine.

Nothing here is used by the filter in production. `tiermail up` and the test fixtures start
the scanners through `runner`, with the project's own configuration from deploy/scanners/ and
a DNS stub (`devdns`) so that no check waits on the network. See docs/operations.md, "Scanners".
"""
