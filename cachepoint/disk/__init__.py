"""Composite disks served as block devices: the NBD server, the composite view and the working layer."""
