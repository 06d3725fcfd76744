"""Nets and pixels: what every engine is (base.py), the net and its engines (model.py: Caffe,
ONNX Runtime, OpenCV DNN; simulated.py: backend=simulated, the benchmarks' stand-in), the converter to ONNX (onnxport.py), BatchNorm folding (fold.py), a net's parameters
(netstate.py), the model proven loadable (modelcheck.py), the GPU self-check (selfcheck.py),
decoding and preprocessing (decode.py, decodepool.py, preprocess.py), pooling (features.py),
FLOPs (flops.py), devices and GPUs (device.py, gpu.py), model downloads (fetch.py).

May import: runner (log), runner.errors, runner.schema, runner.faults, runner.jobs,
runner.store.
"""
