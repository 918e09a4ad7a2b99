"""The virtfs controller: authoritative tables, journal, RPC server and vdctl."""
