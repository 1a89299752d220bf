"""fleece: incremental, off-host backups of running QEMU VMs.

One namespace when installed: ``fleece.exporter`` (QEMU side), ``fleece.repository`` (format, codec,
backends), ``fleece.restore`` (rebuild images) and the command itself (``fleece.cli``, ``fleece.commands``,
``fleece.output``). This module holds only what every part shares: the version, written once.
"""

__version__ = "0.1.0"
