"""Built-in vhost-user back-ends (device implementations over pymvm.vhost.user.backend):
``net`` (a TAP) and ``blk`` (a raw image), each imported by the process that serves it.

Nothing is imported here: a blk back-end (started again by the VMM after a crash, with the
guest's disk I/O waiting for it) must not pay for the net back-end's TAP and netlink
modules (pyroute2), which took half of its start-up."""
