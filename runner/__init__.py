"""caffe-runner: Caffe feature extraction on Slurm arrays or one machine, into HDF5."""
import logging

__version__ = "0.1.0"

# the one named logger of the package
log = logging.getLogger("caffe_runner")
