"""The virtfs agent: a FUSE mount serving virtual disks from a cached segment table."""
