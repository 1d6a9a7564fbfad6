// Instantiations of the forward kernel: {fp16, bf16} x head_dim {64, 128} x block {64, 128}.
#include "bsa_fwd_sm80.cuh"

namespace saexport {

#define SAEXPORT_INSTANTIATE(T, D, M) template void launch_bsa_forward<T, D, M>(const BsaParams&, cudaStream_t);
SAEXPORT_INSTANTIATE(__half, 64, 64)
SAEXPORT_INSTANTIATE(__half, 64, 128)
SAEXPORT_INSTANTIATE(__half, 128, 64)
SAEXPORT_INSTANTIATE(__half, 128, 128)
SAEXPORT_INSTANTIATE(__nv_bfloat16, 64, 64)
SAEXPORT_INSTANTIATE(__nv_bfloat16, 64, 128)
SAEXPORT_INSTANTIATE(__nv_bfloat16, 128, 64)
SAEXPORT_INSTANTIATE(__nv_bfloat16, 128, 128)
#undef SAEXPORT_INSTANTIATE

}  // namespace saexport
