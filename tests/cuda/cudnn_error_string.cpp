// CUDNN_CHECK's message for statuses old and new, with docker/pycaffe-cudnn9.patch's
// caffe/util/cudnn.hpp (tests/test_cuda_build.py): one name a line.
#include "caffe/util/cudnn.hpp"
#include <cstdio>
int main() {
  const cudnnStatus_t codes[3] = {CUDNN_STATUS_BAD_PARAM, CUDNN_STATUS_BAD_PARAM_NULL_POINTER,
                                  CUDNN_STATUS_NOT_SUPPORTED_SHAPE};
  for (int i = 0; i < 3; ++i) printf("%s\n", cudnnGetErrorString(codes[i]));
  return 0;
}
