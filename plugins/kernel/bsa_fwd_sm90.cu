// Instantiations of the Hopper forward kernel: {fp16, bf16}, head_dim 128, block 128.
#include "bsa_fwd_sm90.cuh"

namespace saexport {

template bool launch_bsa_forward_sm90<__half>(const BsaParams&, cudaStream_t);
template bool launch_bsa_forward_sm90<__nv_bfloat16>(const BsaParams&, cudaStream_t);

}  // namespace saexport
