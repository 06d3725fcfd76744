// The cuDNN algorithm choice of docker/pycaffe-cudnn9.patch, run without a GPU: the patched
// cudnn_conv_layer.cpp is compiled in here (its class left uninstantiated: nothing calls cuDNN)
// and its first_fitting_algo / cudnn_workspace_limit_bytes are fed a ranked list.
// Prints "<found> <algo> <limit bytes>" (tests/test_cuda_build.py).
#include "caffe/common.hpp"
#undef INSTANTIATE_CLASS
#define INSTANTIATE_CLASS(classname)
#include "caffe/layers/cudnn_conv_layer.hpp"
#include "cudnn_conv_layer.cpp"
#include <cstdio>
int main() {
  using namespace caffe;
  std::vector<cudnnConvolutionFwdAlgoPerf_t> p(5);
  int algos[5] = {6, 1, 2, 0, 7};
  int status[5] = {0, 0, 9, 0, 0};
  size_t mem[5] = {size_t(200) << 20, size_t(1) << 20, 0, 0, 0};
  // ranked fastest first: 200 MB, 1 MB, not supported, 0 B, 0 B; one in another math type
  int math[5] = {0, 0, 0, 0, 0};
  if (getenv("TEST_TENSOR_OP_SECOND")) math[1] = CUDNN_TENSOR_OP_MATH;
  for (int k = 0; k < 5; ++k) { p[k].algo = (cudnnConvolutionFwdAlgo_t)algos[k]; p[k].status = (cudnnStatus_t)status[k]; p[k].memory = mem[k]; p[k].mathType = (cudnnMathType_t)math[k]; }
  cudnnConvolutionFwdAlgo_t a = (cudnnConvolutionFwdAlgo_t)-1;
  bool ok = first_fitting_algo(p, 5, CUDNN_DEFAULT_MATH, cudnn_workspace_limit_bytes(), &a);
  printf("%d %d %zu\n", (int)ok, (int)a, cudnn_workspace_limit_bytes());
  return 0;
}
