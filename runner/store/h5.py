"""The one way this project opens an HDF5 file (a leaf).

Always without HDF5's own file locking: each attempt writes a file of its own and commits it by
a link (write.py), readers open only committed files, and our locks (locks.py) decide who
writes; HDF5's locking (fcntl/flock on the file) fails with an error on many cluster file
systems (NFS without lockd, Lustre without flock) and would only get in the way there."""
from __future__ import annotations


def open_h5(path, mode: str = "r", **kwargs):
    import h5py  # heavy (the HDF5 library): loaded when a file is first opened, not by every command

    return h5py.File(path, mode, locking=False, **kwargs)
