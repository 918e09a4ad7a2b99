"""The virtfs controller: authoritative tables, journal, RPC server and vdctl."""

__version__ = "0.2.0"  # vdctl, virtfs-controller and virtfs-mount --version
